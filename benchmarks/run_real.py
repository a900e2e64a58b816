"""`make run-real` over several seeds: held-out accuracy before and after RL, wall time, peak memory.

Each seed is one `drpo train --config configs/smollm2-arith.yaml seed=S` in a fresh process (after the warm start
`drpo warmstart --model smollm2-135m-arith --skip-existing`, made once and cached, timed when it runs here).
The RL seed changes the prompts drawn, the samples and the minibatch order; the warm-started model is the same
for every seed (it is made once, with its own seed 0).

    .venv/bin/python benchmarks/run_real.py --seeds 1,2,3 --out benchmarks/results/run_real.json

Prints per seed: accuracy at step 0 and at the last step (held-out, 128 prompts, sampled at temperature 1),
their difference, wall time, peak resident memory of the run's processes; then the mean and the spread.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> float:
    """Run ``cmd`` (output passed through); its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-arith.yaml"))
    ap.add_argument("--runs", default="runs/run_real", help="folder for the runs (one per seed)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    drpo = [sys.executable, "-m", "drpo.cli"]
    report: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M"), "seeds": {}}
    report["warmstart_s"] = run(drpo + ["warmstart", "--model", "smollm2-135m-arith", "--skip-existing"])
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.runs) / f"seed{seed}"
        wall = run(drpo + ["train", "--config", args.config, f"seed={seed}", f"out={out}", "progress=false",
                           *args.overrides])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        accs = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        steps = [r for r in rows if "time/step" in r]
        report["seeds"][seed] = {
            "before": accs[0][1], "after": accs[-1][1], "gain": accs[-1][1] - accs[0][1], "curve": accs,
            "wall_s": wall, "steps": len(steps), "time_step_mean_s": statistics.mean(r["time/step"] for r in steps),
            # resource.getrusage: the largest resident set of any finished child so far (KiB on Linux)
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20,
            "threads": json.loads((out / "status.json").read_text()).get("threads")}
        s = report["seeds"][seed]
        print(f"seed {seed}: {s['before']:.3f} -> {s['after']:.3f} ({100 * s['gain']:+.1f} points), "
              f"{wall / 60:.1f} min, {s['time_step_mean_s']:.1f} s/step, peak RSS {s['peak_rss_gib']:.2f} GiB so far",
              flush=True)
    gains = [s["gain"] for s in report["seeds"].values()]
    report["gain_mean"], report["gain_min"], report["gain_max"] = statistics.mean(gains), min(gains), max(gains)
    print(f"gain over {len(gains)} seeds: mean {100 * report['gain_mean']:+.1f} points "
          f"(min {100 * min(gains):+.1f}, max {100 * max(gains):+.1f})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
