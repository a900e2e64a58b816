"""Forward + backward throughput of the policy objectives through ``drpo.policy_loss``.

    python benchmarks/objectives_bench.py --out benchmarks/results/objectives_cpu.json
    python benchmarks/objectives_bench.py --quick      # 256 x 256 tokens

One step is ``loss, metrics = drpo.policy_loss(name, log_prob, behavior_log_prob, advantages,
mask, agg_mode="token-mean", compute_metrics=...)`` followed by ``loss.backward()``, on a
(batch x length) grid of float32 log-probs (default 1024 x 1024 = 1,048,576 positions, 3/4 of
them unmasked). Every objective runs with its default parameters, once with
``compute_metrics=False`` (the objective alone) and once with ``True``. The objectives are
interleaved within each repetition so that load from other processes hits them alike; the
reported time is the median over repetitions and tokens/s counts all positions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import drpo

OBJECTIVES = ("ppo", "drpo", "dppo", "spo")


def make_batch(batch: int, length: int, device: torch.device, seed: int = 0) -> dict:
    """Synthetic rollout: log mu in [-8, 0], log pi = log mu + N(0, 0.1^2), response masks of random length."""
    g = torch.Generator().manual_seed(seed)
    behavior = -8.0 * torch.rand(batch, length, generator=g) ** 3
    log_prob = (behavior + 0.1 * torch.randn(batch, length, generator=g)).clamp(max=0.0)
    lengths = torch.randint(length // 2, length + 1, (batch, 1), generator=g)
    mask = torch.arange(length)[None, :] < lengths
    advantages = torch.randn(batch, generator=g)
    return {
        "log_prob": log_prob.to(device),
        "behavior_log_prob": behavior.to(device),
        "advantages": advantages.to(device),
        "mask": mask.to(device),
    }


def step(name: str, data: dict, compute_metrics: bool, device: torch.device) -> float:
    """Seconds for one policy_loss forward + backward (synchronised on CUDA)."""
    log_prob = data["log_prob"].detach().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _ = drpo.policy_loss(
        name, log_prob, data["behavior_log_prob"], data["advantages"], data["mask"],
        agg_mode="token-mean", compute_metrics=compute_metrics,
    )
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--quick", action="store_true", help="256 x 256 tokens")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.batch, args.length = 256, 256
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = make_batch(args.batch, args.length, device)
    names = args.objectives.split(",")
    cases = [(n, m) for m in (False, True) for n in names]
    for name, metrics in cases:  # warm-up
        step(name, data, metrics, device)
    times: dict[tuple[str, bool], list[float]] = {c: [] for c in cases}
    for _ in range(args.reps):
        for name, metrics in cases:
            times[(name, metrics)].append(step(name, data, metrics, device))

    tokens = args.batch * args.length
    results = []
    for name, metrics in cases:
        median = statistics.median(times[(name, metrics)])
        ppo = statistics.median(times[("ppo", metrics)]) if "ppo" in names else float("nan")
        results.append({
            "objective": name, "compute_metrics": metrics, "median_s": median,
            "tokens_per_s": tokens / median, "x_ppo": median / ppo, "times_s": times[(name, metrics)],
        })
    print(f"{'objective':<10}{'metrics':>8}{'median ms':>11}{'Mtok/s':>9}{'x ppo':>8}")
    for r in results:
        print(f"{r['objective']:<10}{str(r['compute_metrics']):>8}{1e3 * r['median_s']:>11.1f}"
              f"{r['tokens_per_s'] / 1e6:>9.2f}{r['x_ppo']:>8.3f}")
    if args.out:
        config = {k: v for k, v in vars(args).items() if k != "out"}
        config["unmasked_fraction"] = float(data["mask"].float().mean())
        machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "torch": torch.__version__,
                   "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(
            {"config": {**config, "device": str(device)}, "machine": machine, "results": results},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
