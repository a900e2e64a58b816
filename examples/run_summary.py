"""Summarise a `drpo train` run from its metrics.jsonl: the held-out accuracy at each evaluation, and
the mean / max over steps of any logged keys (defaults: the figures the README quotes).

    python examples/run_summary.py runs/<run> [--keys rollout/mu_lt_0.01_frac mismatch/ratio_max ...]
    python examples/run_summary.py runs/<run> --per-step response/eos_frac obj/ratio_min
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_KEYS = ("rollout/mu_lt_0.01_frac", "response/length_mean", "response/eos_frac",
                "mismatch/abs_shift_mean", "mismatch/abs_shift_max", "mismatch/ratio_max", "mismatch/kl_k3",
                "time/step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run directory (holding metrics.jsonl)")
    ap.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="keys to average over steps")
    ap.add_argument("--per-step", nargs="+", default=[], help="keys to print at every step")
    a = ap.parse_args()
    path = a.run / "metrics.jsonl"
    if not path.is_file():
        ap.error(f"{path} does not exist: pass a run directory written by `drpo train`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "reward/mean" in r]  # training steps (step 0 holds only the first eval)
    print("eval/accuracy:", ", ".join(f"{r['step']}: {r['eval/accuracy']:.3f}" for r in rows if "eval/accuracy" in r))
    for key in a.keys:
        vals = [r[key] for r in steps if key in r]
        if not vals:
            ap.error(f"no step of {path} logs {key!r}")
        print(f"{key}: mean {sum(vals) / len(vals):.4g}, max {max(vals):.4g}, min {min(vals):.4g}, "
              f"first {vals[0]:.4g}, last {vals[-1]:.4g} ({len(vals)} steps)")
    for r in steps:
        if a.per_step:
            print(r["step"], " ".join(f"{k}={r.get(k, float('nan')):.4g}" for k in a.per_step))


if __name__ == "__main__":
    main()
