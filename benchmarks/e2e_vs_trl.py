"""End-to-end RL throughput (rollout + update) of drpo's Trainer against TRL's GRPOTrainer.

    PYTHONPATH=src python benchmarks/e2e_vs_trl.py --out benchmarks/results/e2e_vs_trl.json
    PYTHONPATH=src python benchmarks/e2e_vs_trl.py --quick --out benchmarks/results/e2e_vs_trl_quick.json

Both sides train the SAME model folder (the built-in warm-started tiny Qwen3), loaded the same way
(``drpo.models.loading.load_policy``: float32), on arithmetic prompts of difficulty 1, with the
same batch (P prompts x G samples each), the same sampling (temperature 1, top-p 1, no top-k,
at most L new tokens, stopping at EOS), one optimiser step per rollout batch, the same learning
rate, AdamW, gradient clipping at 1.0, no KL term, and the same number of threads, one after the
other (``--order`` picks which goes first), each in a fresh process of its own: a side runs with its
own library's process settings (ours: the trainer's thread count and its memory policy,
``drpo.utils.memory``) and inherits nothing of the other's (its warm caches, its allocator state).
Both sides score with ``drpo.verify``; each process starts its verifier worker before its timed
steps (a check that needs math-verify), so that neither side's timed steps pay that one-off start-up
(~0.7 s; before, the side that ran first paid it inside a timed step and the second found it warm).

One *step* is everything from sampling a batch to the end of its optimiser step (ours: one call
of ``Trainer.step``; TRL: the interval between two ``on_step_end`` callbacks, i.e. generation,
reward, loss forward, backward, optimiser and TRL's bookkeeping). The first step of each side is
a warm-up and is not timed; the next N are. tokens/s counts the completion tokens actually
sampled (EOS included, padding after EOS excluded): a side whose completions stop earlier does
less work per step, so both the mean completion length and tokens/s are reported.

TRL settings that differ from TRL's own defaults, set here so both sides do the same work:
``gradient_checkpointing=False`` and ``bf16=False`` (GRPOConfig defaults both to True; ours runs
fp32 without checkpointing), ``learning_rate=1e-4`` (ours), ``lr_scheduler_type="constant"``,
``loss_type="dapo"`` (token-mean over the batch, ours' ``agg_mode="token-mean"``), ``beta=0``.
With ``per_device_train_batch_size = P*G`` and ``gradient_accumulation_steps=1``, TRL's
``steps_per_generation`` is 1: one generation batch of P*G completions per optimiser step, and
no separate old-policy log-prob pass (the same as ours with ``train.anchor=rollout``).

Where our step's time goes comes from the phase timings the trainer logs with every step
(``time/rollout``, ``time/reward``, ``time/logprob``, ``time/loss``, ``time/backward``,
``time/optimizer``, ``time/update``, ``time/publish``, ``time/step``), averaged over the timed
steps. For TRL, which logs no such split, its pieces are timed by wrapping them during its timed
run (``_generate_and_score_completions``, ``compute_loss`` = log-prob forward + objective,
``torch.Tensor.backward``, the optimizer's step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def _early_threads(argv: list[str]) -> int:
    """Thread count from the command line, applied to OpenMP/MKL before torch is imported."""
    n = 1
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    return n


_THREADS = _early_threads(sys.argv)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(_THREADS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def summarize(step_times: list[float], tokens: list[float], lengths: list[float]) -> dict:
    """steps/s and tokens/s over the timed steps (totals, not per-step means), and the spread."""
    total = sum(step_times)
    return {
        "steps": len(step_times),
        "total_s": total,
        "step_s_median": statistics.median(step_times),
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "steps_per_s": len(step_times) / total,
        "tokens_per_s": sum(tokens) / total,
        "mean_completion_len": statistics.fmean(lengths),
    }


# ---------------------------------------------------------------------------------------- ours
def build_ours(model: str, out: Path, a) -> "object":
    from drpo.training.config import load_config
    from drpo.training.trainer import Trainer

    cfg = load_config(None, [
        f"model={model}", f"out={out}", f"train.steps={a.steps + 1}",
        f"rollout.prompts_per_step={a.prompts}", f"rollout.group_size={a.group}",
        f"rollout.max_new_tokens={a.max_new_tokens}", "rollout.precision=fp32",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0",
        "train.minibatches=1", f"train.lr={a.lr}", "train.grad_clip=1.0", "objective.name=grpo",
        "eval.every=0", "progress=false", "tensorboard=false", "save_every=0",
        # with an asynchronous rollout worker the cores are split: each process gets half the threads
        f"threads={max(1, a.threads // 2) if a.staleness else a.threads}", f"seed={a.seed}",
        f"rollout.staleness={a.staleness}",
    ])
    return Trainer(cfg)


def run_ours(model: str, workdir: Path, a) -> dict:
    tr = build_ours(model, workdir / "ours", a)
    n_seq = a.prompts * a.group
    t0 = time.perf_counter()
    tr.step(0)  # warm-up (with a rollout worker: its start and first batch)
    warmup_s = time.perf_counter() - t0
    threads = torch.get_num_threads()
    steps, toks, lens, logged, faults = [], [], [], defaultdict(list), []
    for i in range(1, a.steps + 1):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        m = tr.step(i)
        steps.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        lens.append(m["response/length_mean"])
        toks.append(m["response/length_mean"] * n_seq)
        for k, v in m.items():
            if k.startswith("time/") or k == "reward/mean":
                logged[k].append(v)
    tr.rollout.close()
    tr.life.lock.release()
    res = summarize(steps, toks, lens)
    res.update(warmup_s=warmup_s, threads=threads, step_times_s=steps,
               minor_page_faults_per_step=statistics.fmean(faults),  # this process's (drpo.utils.memory)
               reward_mean=statistics.fmean(logged.pop("reward/mean")),
               optimizer=type(tr.optimizer).__name__, profile=profile(logged, a.staleness))
    return res


# the trainer's phase timings (metrics it logs every step) and how they nest in one step
PHASES = {
    "rollout (generate)": "time/rollout",
    "reward (decode + verify)": "time/reward",
    "log-probs forward (with grad)": "time/logprob",
    "objective (policy_loss)": "time/loss",
    "backward": "time/backward",
    "grad clip + optimizer step": "time/optimizer",
    "publish weights to the engine": "time/publish",
}


def profile(logged: dict[str, list[float]], staleness: int = 0) -> dict:
    """Mean seconds per step of each phase, from the trainer's own ``time/*`` metrics. With a rollout
    worker (staleness >= 1) generation and reward run there, overlapped: the trainer's step holds
    only its wait for the worker's batch."""
    mean = {k: statistics.fmean(v) for k, v in logged.items()}
    missing = [k for k in (*PHASES.values(), "time/update", "time/step", "time/wait_rollout") if k not in mean]
    if missing:
        raise RuntimeError(f"the trainer no longer logs {missing}: update PHASES")
    rows = {name: mean[k] for name, k in PHASES.items()}
    if staleness:
        overlapped = {f"{name} [in the rollout worker, overlapped]": rows.pop(name)
                      for name in ("rollout (generate)", "reward (decode + verify)")}
        rows = {"wait for the rollout worker's batch": mean["time/wait_rollout"], **rows}
    inner = sum(mean[k] for k in ("time/logprob", "time/loss", "time/backward", "time/optimizer"))
    rows["update: other (metrics, batching)"] = mean["time/update"] - inner
    step = mean["time/step"]
    rows["outside the timed phases"] = step - sum(rows.values())
    if staleness:
        rows.update(overlapped)
    return {"step_s": step, "seconds": rows, "share": {k: v / step for k, v in rows.items()}}


# ---------------------------------------------------------------------------------------- TRL
class _Timers:
    """Accumulating wall-clock timers for TRL's pieces, installed by wrapping its callables."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, name: str, seconds: float) -> None:
        self.total[name] += seconds
        self.calls[name] += 1

    def wrap(self, name: str, fn):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.add(name, time.perf_counter() - t0)
        return timed


def run_trl(model: str, workdir: Path, a) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from drpo import verify
    from drpo.tasks.arithmetic import ArithmeticTask
    from drpo.models.loading import load_policy

    tokenizer, net = load_policy(model)
    n_rows = (a.steps + 1) * a.prompts * 2
    rows = ArithmeticTask(1).train_examples(n_rows)
    ds = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in rows])

    lengths_per_call: list[list[int]] = []
    rewards_per_call: list[float] = []

    def reward(prompts, completions, answer, completion_ids=None, **kw) -> list[float]:
        """1.0 when the last \\boxed{} answer matches, via drpo.verify (the reward ours uses)."""
        out = [1.0 if verify(c, g) else 0.0 for c, g in zip(completions, answer)]
        lengths_per_call.append([len(ids) for ids in completion_ids])
        rewards_per_call.append(statistics.fmean(out))
        return out

    timers = _Timers()

    class StepClock(TrainerCallback):
        """Time of each step's end; hooks the optimizer's step time once the optimizer exists."""

        def __init__(self) -> None:
            self.begin = None
            self.ends: list[float] = []
            self.threads: list[int] = []

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            self.begin = time.perf_counter()
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch's
            start = {}
            opt.register_step_pre_hook(lambda o, a_, k: start.__setitem__("t", time.perf_counter()))
            opt.register_step_post_hook(lambda o, a_, k: timers.add("optimizer_step", time.perf_counter() - start["t"]))

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.threads.append(torch.get_num_threads())

    clock = StepClock()
    cfg = GRPOConfig(
        output_dir=str(workdir / "trl"), use_cpu=True, seed=a.seed,
        per_device_train_batch_size=a.prompts * a.group, gradient_accumulation_steps=1,
        num_generations=a.group, max_completion_length=a.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        loss_type="dapo", beta=0.0, num_iterations=1,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=a.steps + 1,
        bf16=False, fp16=False, gradient_checkpointing=False,
        logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=net, reward_funcs=[reward], args=cfg, train_dataset=ds,
                          processing_class=tokenizer, callbacks=[clock])
    # split of TRL's step: rollout + reward (+ any old-logprob pass), the loss (log-prob forward
    # + objective), backward, optimizer; wrappers cost microseconds per call
    trainer._generate_and_score_completions = timers.wrap("generate_and_score",
                                                          trainer._generate_and_score_completions)
    trainer.compute_loss = timers.wrap("compute_loss", trainer.compute_loss)
    saved_backward = torch.Tensor.backward
    torch.Tensor.backward = timers.wrap("backward", saved_backward)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        torch.Tensor.backward = saved_backward
    total = time.perf_counter() - t0

    ends = clock.ends
    if len(ends) != a.steps + 1 or len(lengths_per_call) != a.steps + 1:
        raise RuntimeError(f"expected {a.steps + 1} steps and generations, got {len(ends)} steps, "
                           f"{len(lengths_per_call)} generations")
    steps = [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    lens = [statistics.fmean(x) for x in lengths_per_call[1:]]
    toks = [float(sum(x)) for x in lengths_per_call[1:]]
    res = summarize(steps, toks, lens)
    res.update(warmup_s=ends[0] - clock.begin, train_call_s=total, threads=clock.threads[-1],
               step_times_s=steps, reward_mean=statistics.fmean(rewards_per_call[1:]),
               n_completions_per_step=len(lengths_per_call[-1]),
               steps_per_generation=cfg.steps_per_generation,
               generation_batch_size=cfg.generation_batch_size,
               optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__,
               optim_arg=str(cfg.optim),
               split_s_per_step={k: timers.total[k] / timers.calls[k] for k in timers.total},
               split_calls=dict(timers.calls),
               split_note="means over all calls, the warm-up step included")
    return res


# ---------------------------------------------------------------------------------------- main
def run_side(a) -> None:
    """One side, in this (fresh) process: start the verifier's worker, run, write the result to --side-out."""
    from drpo import verify
    from drpo.models.loading import resolve_model

    assert verify("\\boxed{1/2}", "0.5")  # not equal as text: math-verify decides, in a worker started now
    model = resolve_model(a.model)
    with tempfile.TemporaryDirectory(prefix=f"e2e_{a.side}_") as tmp:
        res = (run_ours if a.side == "ours" else run_trl)(model, Path(tmp), a)
    a.side_out.write_text(json.dumps(res))


def check_tokenizer(model: str) -> dict:
    """TRL tokenises plain-string prompts with special tokens on, ours with them off: same ids?"""
    from drpo.tasks.arithmetic import ArithmeticTask
    from drpo.models.loading import load_policy

    tok, _ = load_policy(model)
    prompts = [e.prompt for e in ArithmeticTask(1).train_examples(8)]
    same = all(tok(p)["input_ids"] == tok(p, add_special_tokens=False)["input_ids"] for p in prompts)
    return {"class": type(tok).__name__, "padding_side": tok.padding_side, "pad": tok.pad_token,
            "eos": tok.eos_token, "bos": tok.bos_token, "chat_template": bool(getattr(tok, "chat_template", None)),
            "prompt_ids_same_with_and_without_special_tokens": same}


def print_table(ours: dict, trl: dict, ratio: float, target: float) -> None:
    print()
    print("| trainer | steps/s | tokens/s | mean completion len | median step s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("drpo Trainer", ours), ("TRL GRPOTrainer", trl)):
        print(f"| {name} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{r['mean_completion_len']:.2f} | {r['step_s_median']:.3f} |")
    print(f"\nours / TRL steps/s: {ratio:.2f}x (target >= {target:.1f}x: {'met' if ratio >= target else 'NOT met'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: P=4, G=4, N=3")
    p.add_argument("--prompts", type=int, default=16, help="P: prompts per step")
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16, help="L: max completion tokens")
    p.add_argument("--steps", type=int, default=10, help="N: timed steps per side (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=_THREADS,
                   help="cores for each side: TRL's torch threads; ours' threads, split between trainer and "
                        "rollout worker with --staleness >= 1")
    p.add_argument("--staleness", type=int, default=0,
                   help="ours: rollout.staleness (0 = synchronous, TRL's setting; 1 = one step off-policy, "
                        "generation overlapped with training in its own process)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="builtin")
    p.add_argument("--order", choices=("ours-first", "trl-first"), default="ours-first")
    p.add_argument("--target", type=float, default=2.0, help="required ours/TRL steps/s ratio")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--side", choices=("ours", "trl"), default=None,
                   help="run only this side, in this process, and write its results to --side-out (what main "
                        "does in a child process per side; with PYTHONPATH=<checkout>/src it times another version)")
    p.add_argument("--side-out", type=Path, default=None)
    a = p.parse_args()
    if a.quick:
        a.prompts, a.group, a.steps = 4, 4, 3
    torch.set_num_threads(a.threads)
    if a.side:
        if a.side_out is None:
            p.error("--side needs --side-out")
        run_side(a)
        return

    from drpo.models.loading import resolve_model
    import transformers
    import trl

    model = resolve_model(a.model)
    info = {"tokenizer": check_tokenizer(model)}
    print(f"model {model}; P={a.prompts} G={a.group} L={a.max_new_tokens} N={a.steps} threads={a.threads}",
          flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="e2e_vs_trl_") as tmp:
        work = Path(tmp)
        order = ("ours", "trl") if a.order == "ours-first" else ("trl", "ours")
        for side in order:  # each side in a fresh process (module docstring)
            before = loadavg()
            t0 = time.perf_counter()
            out = work / f"{side}.json"
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side, "--side-out", str(out)],
                           check=True)
            res = json.loads(out.read_text())
            res["wall_s"] = time.perf_counter() - t0
            res["loadavg_before"], res["loadavg_after"] = before, loadavg()
            results[side] = res
            print(f"{side}: {res['steps_per_s']:.3f} steps/s, {res['tokens_per_s']:.1f} tok/s, "
                  f"mean len {res['mean_completion_len']:.2f}, load {before} -> {res['loadavg_after']}",
                  flush=True)

    ours, trl_r = results["ours"], results["trl"]
    ratio = ours["steps_per_s"] / trl_r["steps_per_s"]
    tok_ratio = ours["tokens_per_s"] / trl_r["tokens_per_s"]
    print_table(ours, trl_r, ratio, a.target)
    print(f"ours / TRL tokens/s: {tok_ratio:.2f}x")
    prof = ours["profile"]
    print(f"\nwhere our step's time goes (the trainer's time/* metrics over {a.steps} steps, {prof['step_s']:.3f} s/step):")
    for k, v in prof["seconds"].items():
        print(f"  {k:<48s} {v * 1000:8.1f} ms  {100 * prof['share'][k]:5.1f} %")
    sp = trl_r["split_s_per_step"]
    print(f"TRL, per step (mean over all steps, warm-up included), median step {trl_r['step_s_median']:.3f} s:")
    for k in ("generate_and_score", "compute_loss", "backward", "optimizer_step"):
        print(f"  {k:<48s} {sp.get(k, float('nan')) * 1000:8.1f} ms")

    if a.out:
        out = {
            "benchmark": "e2e_vs_trl", "quick": a.quick,
            "settings": {"prompts": a.prompts, "group": a.group, "max_new_tokens": a.max_new_tokens,
                         "steps": a.steps, "warmup_steps": 1, "staleness_ours": a.staleness,
                         "threads": a.threads, "lr": a.lr, "seed": a.seed, "model": a.model,
                         "model_dir": model, "order": a.order, "trl_loss_type": "dapo",
                         "ours_objective": "grpo (agg_mode token-mean)"},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "trl": trl.__version__,
                            "machine": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), **info},
            "ours": ours, "trl": trl_r,
            "ratio_steps_per_s": ratio, "ratio_tokens_per_s": tok_ratio,
            "target": a.target, "target_met": ratio >= a.target,
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
