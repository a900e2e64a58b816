"""Cost per token of the tiny MoE against the tiny dense model: the trainer's forward + backward and
the rollout engine's sampling, on batches shaped like one default RL step.

    PYTHONPATH=src python benchmarks/moe_cost.py                       # 1 thread, the defaults below
    PYTHONPATH=src python benchmarks/moe_cost.py --threads 2 --impls eager,grouped_mm,batched_mm

Models: the built-in configs of :mod:`drpo.models.tiny` (dense Qwen3, Qwen3-MoE 8 experts top-2)
with random weights (no warm start). Batch: the default RL step, 16 prompts of the arithmetic task
(9-33 tokens, left-padded) x 8 samples = 128 sequences, 16 response tokens each.

trainer   forward + backward of the trainer's log-prob pass
          (:func:`drpo.training.logprobs.response_logprobs`, loss = -mean log pi over response
          tokens), over the 128 sequences in ``--minibatches`` minibatches as the trainer runs
          them; for the MoE once per ``experts_implementation`` in ``--impls`` (set with
          ``model.set_experts_implementation``). ``--bf16-trainer`` adds the simulated bf16
          trainer (train.precision=bf16: every matmul's inputs and outputs rounded to bf16).
engine    :class:`drpo.rollout.engine.HFRolloutEngine` at ``--engine-precision`` (default fp8)
          sampling 16 new tokens for each of the 128 sequences (KV cache; the MoE records its
          routing). For the MoE twice: with drpo's current bf16-rounding experts forward
          (``precision._bf16_experts_forward``), and with the per-expert loop it replaced
          (``loop_bf16_experts_forward`` below, the code before that change), so that one run
          gives both figures.
warm start  with ``--warmstart``: one supervised step of :func:`drpo.builtin.warmstart.warm_start`
          (64 demonstrations, the MoE with its router aux loss, AdamW) and one held-out evaluation
          (:func:`~drpo.builtin.warmstart.heldout_accuracy`: HF ``generate`` on 128 prompts, 16 tokens),
          dense vs MoE (the MoE at its default experts implementation).

Cost per token = median wall time / tokens (trainer and warm-start step: all positions computed;
engine: response tokens sampled; warm-start evaluation: per prompt). The variants run interleaved, one repetition of each in turn, so that
load from other jobs on a shared machine falls on all of them alike; the load average is printed.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import types
from typing import Callable, Optional

import torch
from torch import nn

from drpo.models.moe import experts_modules
from drpo.models.tiny import build_tiny_model, tiny_config
from drpo.builtin.tokenizer import build_tokenizer
from drpo.rollout.engine import HFRolloutEngine, SamplingParams, left_pad
from drpo.rollout.precision import loop_bf16_experts_forward, use_bf16_compute_
from drpo.tasks.arithmetic import ArithmeticTask
from drpo.training.logprobs import response_logprobs


def use_loop_experts_(model: nn.Module) -> None:
    """Replace the bf16-rounding experts forward of ``model`` by :func:`loop_bf16_experts_forward`."""
    for m in experts_modules(model):
        m.forward = types.MethodType(loop_bf16_experts_forward, m)


def step_batch(tok, prompts_per_step: int, group_size: int, new_tokens: int, seed: int = 0):
    """(prompt ids, prompt mask, response ids, response mask, prompt token lists) of one RL step."""
    task = ArithmeticTask(seed=seed)
    prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in task.heldout(prompts_per_step)]
    rows = [p for p in prompts for _ in range(group_size)]
    pid, pmask = left_pad(rows, tok.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    rid = torch.randint(0, len(tok), (len(rows), new_tokens), generator=g)
    return pid, pmask, rid, torch.ones_like(rid), prompts


def trainer_pass(model: nn.Module, batch, minibatches: int) -> Callable[[], None]:
    """One forward + backward of -mean log pi over the batch, minibatch by minibatch."""
    pid, pmask, rid, rmask, _ = batch
    chunks = torch.arange(len(pid)).chunk(minibatches)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        for idx in chunks:
            lp, _, _ = response_logprobs(model, pid[idx], pmask[idx], rid[idx], rmask[idx])
            (-(lp * rmask[idx]).sum() / rmask[idx].sum()).backward()
    return run


def engine_pass(engine: HFRolloutEngine, prompts, group_size: int, new_tokens: int,
                counted: list) -> Callable[[], None]:
    params = SamplingParams(max_new_tokens=new_tokens, n=group_size)

    def run() -> None:
        b = engine.generate(prompts, params, torch.Generator().manual_seed(0))
        counted.append(int(b.response_mask.sum()))
    return run


def warmstart_passes(model: nn.Module, tok, moe: bool) -> tuple[Callable[[], None], Callable[[], None], int]:
    """(one supervised warm-start step, one held-out evaluation, positions in the step's batch), as
    :func:`drpo.builtin.warmstart.warm_start` runs them with its default hyperparameters."""
    import random

    from drpo.builtin.warmstart import WarmStartHParams, encode_pairs, heldout_accuracy

    hp = WarmStartHParams()
    task = ArithmeticTask(difficulty=hp.difficulty, seed=0)
    stream, rng = iter(task), random.Random(1)
    examples = [next(stream) for _ in range(hp.batch_size)]
    batch = encode_pairs(tok, [e.prompt for e in examples],
                         [task.reference_response(e, rng, hp.demo_accuracy) for e in examples])
    evalset = task.heldout(hp.n_eval)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    def step() -> None:
        model.train()
        loss = model(**batch, **({"output_router_logits": True} if moe else {})).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def evaluate() -> None:
        torch.manual_seed(0)
        heldout_accuracy(model, tok, evalset, max_new_tokens=hp.max_new_tokens)
    return step, evaluate, batch["input_ids"].numel()


def matmul_probe(reps: int = 7) -> tuple[float, float]:
    """Median ms of one (256 x 128) @ (128 x 192) matmul, and of a grouped matmul of the same rows over
    8 experts (the MoE's gate/up projection for 128 tokens x top-2), at the current thread count.
    On an idle machine both take a fraction of a millisecond; when other jobs hold the cores, every
    multi-threaded matmul can wait for its sibling thread's time slice (measured here: ~16 ms each
    with 2 threads), and the MoE, with one matmul per expert, waits 8 times per projection."""
    x, w = torch.randn(256, 128), torch.randn(8, 128, 192)
    offs = torch.arange(32, 257, 32, dtype=torch.int32)
    grouped = getattr(torch.nn.functional, "grouped_mm", None)

    def med(f: Callable[[], object]) -> float:
        f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3
    return med(lambda: x @ w[0]), (med(lambda: grouped(x, w, offs=offs)) if grouped else float("nan"))


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median taken)")
    ap.add_argument("--impls", default="eager,grouped_mm",
                    help="MoE experts_implementation values for the trainer rows (eager, grouped_mm, batched_mm)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (default RL step: 16)")
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt (default RL step: 8)")
    ap.add_argument("--new-tokens", type=int, default=16, help="response tokens (default RL step: 16)")
    ap.add_argument("--minibatches", type=int, default=4, help="trainer minibatches (default RL step: 4)")
    ap.add_argument("--engine-precision", default="fp8", choices=["fp32", "bf16", "fp8"])
    ap.add_argument("--bf16-trainer", action="store_true", help="also time the simulated bf16 trainer")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine rows")
    ap.add_argument("--warmstart", action="store_true", help="also time a warm-start step and evaluation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tok = build_tokenizer()
    batch = step_batch(tok, args.prompts, args.group_size, args.new_tokens)
    positions = batch[0].numel() + batch[2].numel()
    configs = {a: tiny_config(a, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              bos_token_id=None) for a in ("dense", "moe")}

    def build(arch: str) -> nn.Module:
        """A model with its own copy of the config: the experts implementation is a config setting,
        and models built from one config object share it."""
        return build_tiny_model(copy.deepcopy(configs[arch]), seed=0)
    default_impl = build("moe").config._experts_implementation

    variants: dict[str, tuple[Callable[[], None], str, list]] = {}  # name -> (run, kind, token counts)
    dense = build("dense")
    variants["trainer dense"] = (trainer_pass(dense, batch, args.minibatches), "trainer", [])
    for impl in [s for s in args.impls.split(",") if s]:
        m = build("moe")
        m.set_experts_implementation(impl)
        assert m.config._experts_implementation == impl
        variants[f"trainer moe {impl}"] = (trainer_pass(m, batch, args.minibatches), "trainer", [])
    if args.bf16_trainer:
        d16 = build("dense")
        use_bf16_compute_(d16, round_weights=True)
        variants["trainer dense bf16-sim"] = (trainer_pass(d16, batch, args.minibatches), "trainer", [])
        for loop in (False, True):
            m16 = build("moe")
            use_bf16_compute_(m16, round_weights=True)
            if loop:
                use_loop_experts_(m16)
            name = "trainer moe bf16-sim " + ("loop (before)" if loop else "drpo")
            variants[name] = (trainer_pass(m16, batch, args.minibatches), "trainer", [])
    if not args.no_engine:
        p = args.engine_precision
        prompts = batch[4]
        kw = dict(precision=p, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        counts: list = []
        variants[f"engine dense {p}"] = (engine_pass(HFRolloutEngine(build("dense"), **kw), prompts,
                                                     args.group_size, args.new_tokens, counts), "engine", counts)
        for loop in ((False, True) if p != "fp32" else (False,)):
            eng = HFRolloutEngine(build("moe"), **kw)
            if loop:
                use_loop_experts_(eng.model)
            counts = []
            name = f"engine moe {p}" + ((" loop (before)" if loop else " drpo") if p != "fp32" else "")
            variants[name] = (engine_pass(eng, prompts, args.group_size, args.new_tokens, counts), "engine", counts)

    sizes = {"trainer": positions, "engine": None}
    if args.warmstart:
        for arch in ("dense", "moe"):
            step, evaluate, n = warmstart_passes(build(arch), tok, moe=arch == "moe")
            sizes["warmstart step"], sizes["warmstart eval"] = n, 128
            variants[f"warmstart step {arch}"] = (step, "warmstart step", [])
            variants[f"warmstart eval {arch}"] = (evaluate, "warmstart eval", [])

    print(f"torch {torch.__version__}, threads {args.threads}, cpus {os.cpu_count()}, "
          f"MoE default experts_implementation here: {default_impl}", flush=True)
    print(f"batch: {len(batch[0])} sequences, prompt width {batch[0].shape[1]}, {args.new_tokens} response tokens; "
          f"load average before: {loadavg()}", flush=True)
    one, grouped = matmul_probe()
    print(f"probe: one 256x128x192 matmul {one:.3f} ms, grouped over 8 experts {grouped:.3f} ms "
          f"(idle machine: well under 1 ms; much more means other jobs hold the cores)", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for run, _, _ in variants.values():  # warm-up
        run()
    for v in variants.values():
        v[2].clear()
    for _ in range(args.reps):
        for name, (run, _, _) in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    per_tok: dict[str, tuple[float, float]] = {}  # name -> (median, minimum) microseconds per token
    print(f"\n{'variant':34s} {'median s':>9s} {'min s':>8s} {'tokens':>7s} {'us/token':>9s}")
    for name, (_, kind, counts) in variants.items():
        n = statistics.median(counts) if kind == "engine" else sizes[kind]
        med, low = statistics.median(times[name]), min(times[name])
        per_tok[name] = (med / n * 1e6, low / n * 1e6)
        print(f"{name:34s} {med:9.3f} {low:8.3f} {n:7.0f} {per_tok[name][0]:9.1f}")
    print("\nMoE / dense cost per token, from the medians (and from the minima: less disturbed by other jobs):")
    for name in per_tok:
        if name.startswith("warmstart") and name.endswith(" moe"):
            ref = name[:-len("moe")] + "dense"
        elif " moe " in f" {name} ":
            kind = name.split()[0]
            ref = f"{kind} dense" + (" bf16-sim" if "bf16-sim" in name else "") + (
                f" {args.engine_precision}" if kind == "engine" else "")
        else:
            continue
        (med, low), (ref_med, ref_low) = per_tok[name], per_tok[ref]
        print(f"  {name:34s} {med / ref_med:5.2f}x  (min {low / ref_low:5.2f}x)  vs {ref}")
    print(f"\nload average after: {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
