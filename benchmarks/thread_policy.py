"""The default run's step time on an idle machine and beside one and two busy processes, for fixed thread
counts with OpenMP's spinning and passive wait policies, and for drpo's default policy (threads unset:
the cores free at start, OpenMP's default wait policy; drpo.training.threads).

    python benchmarks/thread_policy.py [--steps 12] [--out benchmarks/results/thread_policy.json]

Each cell runs ``drpo train`` (the default config, no evaluation or checkpoints) for ``--steps`` steps in a
fresh process and reports the mean ``time/step`` of the steps after the first two (warm-up). A busy process
is ``python -c "while True: pass"``. Run it on an otherwise idle machine: anything else running is load too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # label: (threads override or None, OMP_WAIT_POLICY or None = drpo's default)
    "threads=1": ("1", "ACTIVE"),
    "threads=2, spinning (OpenMP's default)": ("2", "ACTIVE"),
    "threads=2, passive": ("2", "PASSIVE"),
    "default (drpo's policy)": (None, None),
}


def step_time(threads: str | None, wait: str | None, steps: int) -> tuple[float, int]:
    """(mean seconds per step after the first two, the thread count the run used)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait is not None:
        env["OMP_WAIT_POLICY"] = wait
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        args = [sys.executable, "-m", "drpo.cli", "train", "--out", str(out), f"train.steps={steps}", "eval.every=0",
                "save_every=0", "progress=false", "tensorboard=false"] + ([f"threads={threads}"] if threads else [])
        subprocess.run(args, check=True, env=env, capture_output=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        used = json.loads((out / "status.json").read_text()).get("threads")
    return statistics.mean(r["time/step"] for r in rows[2:]), used


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside the run")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    table: dict[str, dict[str, dict]] = {}
    for load in a.loads:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(1.0)  # let the load settle (the default policy samples it at start)
            for label, (threads, wait) in VARIANTS.items():
                s, used = step_time(threads, wait, a.steps)
                table.setdefault(label, {})[str(load)] = {"s_per_step": round(s, 3), "threads": used}
                print(f"load {load}: {label:40s} {s:.3f} s/step (threads {used})", flush=True)
        finally:
            for b in busy:
                b.kill()
    fixed = [k for k in VARIANTS if k != "default (drpo's policy)"]
    print("\n| busy processes | " + " | ".join(VARIANTS) + " | default vs best fixed |")
    print("|---|" + "---|" * (len(VARIANTS) + 1))
    verdict = {}
    for load in map(str, a.loads):
        best = min(table[k][load]["s_per_step"] for k in fixed)
        d = table["default (drpo's policy)"][load]["s_per_step"]
        verdict[load] = round(d / best - 1, 3)
        cells = [f"{table[k][load]['s_per_step']:.2f} s ({table[k][load]['threads']})" for k in VARIANTS]
        print(f"| {load} | " + " | ".join(cells) + f" | {100 * (d / best - 1):+.0f}% |")
    print("\ntargets: idle within 5% of the best fixed choice, under load within 10%: "
          + ", ".join(f"load {k}: {'met' if v <= (0.05 if k == '0' else 0.10) else 'NOT met'}" for k, v in verdict.items()))
    if a.out:
        a.out.write_text(json.dumps({"steps": a.steps, "cpus": len(os.sched_getaffinity(0)), "table": table,
                                     "default_vs_best": verdict, "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()
