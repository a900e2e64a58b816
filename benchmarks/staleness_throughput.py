"""RL steps per second of the default run with synchronous rollouts (staleness 0) and with the
asynchronous rollout worker (staleness 1): the worker generates batch t+1 while the trainer trains on
batch t, each on its own share of the cores.

    python benchmarks/staleness_throughput.py [--steps 20] [--out benchmarks/results/staleness_throughput.json]

Both runs are the embedded default (`drpo train`: builtin model, FP8 rollout, 16 x 8 samples, K = 4)
with held-out evaluation and checkpoints off, torch's default threads (N = 0: the trainer uses all
cores; N = 1: half each, see `threads` in the config). The first 2 steps are not timed (warm-up;
for N = 1 the first batch is generated while nothing else runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def steps_per_second(staleness: int, steps: int, warmup: int = 2) -> dict:
    from drpo.training.config import load_config
    from drpo.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="drpo-stale-bench-") as tmp:
        cfg = load_config(None, [f"out={tmp}/run", f"rollout.staleness={staleness}", "eval.every=0", "save_every=0",
                                 "progress=false", "tensorboard=false", f"train.steps={steps + warmup}"])
        tr = Trainer(cfg)
        for i in range(warmup):
            tr.step(i)
        t0 = time.perf_counter()
        rows = [tr.step(i) for i in range(warmup, warmup + steps)]
        wall = time.perf_counter() - t0
        tr.rollout.close()
        tr.life.lock.release()
    import torch

    return {"staleness": staleness, "steps": steps, "seconds": wall, "steps_per_s": steps / wall,
            "trainer_threads": torch.get_num_threads(),
            "mean_time_update_s": sum(r["time/update"] for r in rows) / steps,
            "mean_wait_rollout_s": sum(r["time/wait_rollout"] for r in rows) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    res = [steps_per_second(n, a.steps) for n in (0, 1)]
    for r in res:
        print(f"staleness {r['staleness']}: {r['steps_per_s']:.3f} steps/s ({r['steps']} steps in {r['seconds']:.1f} s; "
              f"trainer threads {r['trainer_threads']}; update {r['mean_time_update_s']:.3f} s, "
              f"waiting for the rollout {r['mean_wait_rollout_s']:.3f} s per step)")
    ratio = res[1]["steps_per_s"] / res[0]["steps_per_s"]
    print(f"staleness 1 / staleness 0: {ratio:.2f}x (target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'})")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"benchmark": "staleness_throughput", "runs": res, "ratio": ratio,
                                     "cpu_count": os.cpu_count(), "python": platform.python_version(),
                                     "loadavg_after": os.getloadavg()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
