"""Where a real-model RL step's time goes, against the floor this CPU's float32 matmul throughput sets for its FLOPs.

The step is `make run-real`'s (configs/smollm2-arith.yaml: SmolLM2-135M-Instruct warm-started on arithmetic,
8 prompts x 8 samples, <= 16 new tokens, 2 minibatches, FP8 rollout simulated by rounding). It runs
``--steps`` steps (after one warm-up step, not timed) with ``--threads`` threads and reports the trainer's own
``time/*`` metrics, averaged.

The floor. With P_b the parameters of the decoder's layers (all but the embedding: 106.2 M) and P_h those of the
LM head (49,152 x 576 = 28.3 M, tied to the embedding), a token through the layers costs 2 P_b FLOPs forward and
4 P_b backward, a logit row 2 P_h. Counted per step, from the tokens the models actually ran on (hooks on both
decoders; real tokens, padding not counted; with train.share_prompts each distinct prompt once per micro-batch):

    rollout  2 P_b (T_prefill + T_decode) + 2 P_h T_decode        (one logit row per sampled token)
    update   6 P_b T_train + 8 P_h R_train                         (the chunked log-prob op computes the
                                                                    logits forward, again in backward, and two
                                                                    gradient matmuls)
    floor    = (rollout + update) / F,   F = float32 matmul throughput measured here at the same thread count on
               the model's own matmul shapes (attention's score matmuls, norms and the optimiser not counted: a
               floor, not a model of the time)

    .venv/bin/python benchmarks/real_step.py --threads 2 --out benchmarks/results/real_model/real_step_t2.json
    (add --no-share for the same step with train.share_prompts=false)
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(hidden: int, ffn: int, vocab: int, tokens: int = 1024, repeats: int = 5) -> dict[str, float]:
    """float32 GFLOP/s of the model's matmul shapes ((tokens x in) @ (in x out)), the median of ``repeats``."""
    shapes = {"qkvo": (hidden, hidden), "up": (hidden, ffn), "down": (ffn, hidden), "head": (hidden, vocab)}
    out = {}
    for name, (k, n) in shapes.items():
        a, b = torch.randn(tokens, k), torch.randn(k, n)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        out[name] = 2 * tokens * k * n / statistics.median(times) / 1e9
    return out


class TokenCount:
    """A forward pre-hook on a decoder: adds up the real (unmasked) tokens of the positions it runs on."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.tokens = 0
        self.handle = decoder.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None:
            self.tokens += int(mask[:, -ids.shape[1]:].sum()) if mask is not None else ids.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    ap.add_argument("--model", default="smollm2-135m-arith")
    ap.add_argument("--no-share", action="store_true", help="train.share_prompts=false")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides")
    args = ap.parse_args()

    from drpo.training.config import load_config
    from drpo.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "smollm2-arith.yaml",
                          [f"model={args.model}", f"out={tmp}/run", f"threads={args.threads}", "eval.every=0",
                           "save_every=0", "progress=false", f"train.steps={args.steps + 1}",
                           f"train.share_prompts={'false' if args.no_share else 'true'}", *args.overrides])
        tr = Trainer(cfg)
        engine_model = getattr(getattr(tr.rollout, "engine", None), "model", None)
        if engine_model is None:
            raise SystemExit("this benchmark counts the HF engine's tokens in-process: use rollout.staleness=0 and "
                             "rollout.engine=hf")
        mc = tr.model.config
        P_h = mc.vocab_size * mc.hidden_size
        P_b = sum(p.numel() for p in tr.model.parameters()) - P_h  # tied head: the embedding is the head
        F = matmul_gflops(mc.hidden_size, mc.intermediate_size, mc.vocab_size)
        F_mean = statistics.mean(F.values()) * 1e9
        tr.step(0)  # warm-up
        train_count, engine_count = TokenCount(tr.model.get_decoder()), TokenCount(engine_model.get_decoder())
        rows = []
        for i in range(1, args.steps + 1):
            t0, e0 = train_count.tokens, engine_count.tokens
            m = tr.step(i)
            sampled = m["response/length_mean"] * cfg.rollout.prompts_per_step * cfg.rollout.group_size
            T_train, T_engine = train_count.tokens - t0, engine_count.tokens - e0
            R_train = sampled * cfg.train.epochs  # every sampled token is scored once per epoch
            rollout = 2 * P_b * T_engine + 2 * P_h * sampled
            update = 6 * P_b * T_train + 8 * P_h * R_train
            rows.append({**{k: v for k, v in m.items() if k.startswith("time/")}, "tokens_sampled": sampled,
                         "tokens_engine": T_engine, "tokens_trainer": T_train, "flops_rollout": rollout,
                         "flops_update": update, "floor_s": (rollout + update) / F_mean,
                         "floor_rollout_s": rollout / F_mean, "floor_update_s": update / F_mean})
        tr.rollout.close()
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    report = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "P_body": P_b, "P_head": P_h, "matmul_gflops": F, "mean": mean, "steps": rows,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    print(f"{args.model}, {args.threads} thread(s), share_prompts={not args.no_share}: float32 matmul "
          + ", ".join(f"{k} {v:.0f}" for k, v in F.items()) + " GFLOP/s")
    print(f"per step (mean of {len(rows)}): {mean['time/step']:.2f} s; floor {mean['floor_s']:.2f} s "
          f"(rollout {mean['floor_rollout_s']:.2f}, update {mean['floor_update_s']:.2f}); "
          f"step / floor = {mean['time/step'] / mean['floor_s']:.2f}")
    for k in ("time/rollout", "time/reward", "time/logprob", "time/loss", "time/backward", "time/optimizer",
              "time/update", "time/publish"):
        if k in mean:
            print(f"  {k:16s} {mean[k]:7.2f} s")
    print(f"  tokens: sampled {mean['tokens_sampled']:.0f}, engine {mean['tokens_engine']:.0f}, "
          f"trainer {mean['tokens_trainer']:.0f}; peak RSS {report['peak_rss_gib']:.2f} GiB")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
