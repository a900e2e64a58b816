"""Rollout/trainer mismatch, side by side, per engine x precision x model x staleness.

    .venv-vllm/bin/python benchmarks/calibration.py --out benchmarks/results/calibration.json
    .venv-vllm/bin/python benchmarks/calibration.py --rows fp4 --rows int4 --out benchmarks/results/calibration.json

``--rows S`` (repeatable) runs only the rows whose label contains S, and merges them into an existing
``--out`` file (the other rows kept; refused if that file was measured over other steps).

Each row is a short run of the embedded default (`drpo train`: built-in task, 16 prompts x 8 samples,
K = 4, DRPO delta 12.5, lr 1e-4) with the row's overrides, held-out evaluation and checkpoints off.
The figures are the trainer's own first-minibatch metrics (before any update on the batch: pi is the
trainer's current policy, mu the engine's probability of the sampled token), averaged over the
measured steps (steps 5 to 12, so that staleness 4 has reached its full lag):

    mean |r - 1|, min / max r, k3 KL (mean of r - 1 - log r), mean / max |pi - mu|,
    share of tokens with |pi - mu| > 0.15, and for the MoE the share of routing decisions (token x
    layer top-k sets) that differ between engine and trainer.

Rows with rollout.engine=vllm need vLLM (run the script with .venv-vllm's python); without it they
are reported as skipped. Published figures for comparison are printed below the table.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import tempfile
from pathlib import Path

ROWS: list[tuple[str, list[str]]] = [
    ("HF fp32, dense (control: no mismatch)", ["rollout.precision=fp32"]),
    ("HF bf16, dense", ["rollout.precision=bf16"]),
    ("HF fp8, dense (the default)", ["rollout.precision=fp8"]),
    ("HF fp4 (NVFP4), dense", ["rollout.precision=fp4"]),
    ("HF int4 (weight-only), dense", ["rollout.precision=int4"]),
    ("vLLM bf16, dense", ["rollout.engine=vllm", "rollout.precision=bf16"]),
    ("vLLM fp8 weights, dense", ["rollout.engine=vllm", "rollout.precision=fp8"]),
    ("vLLM fp4 (NVFP4) weights, dense", ["rollout.engine=vllm", "rollout.precision=fp4"]),
    ("vLLM int4 weights, dense", ["rollout.engine=vllm", "rollout.precision=int4"]),
    ("HF bf16, MoE", ["model=builtin-moe", "rollout.precision=bf16"]),
    ("HF fp8, MoE", ["model=builtin-moe", "rollout.precision=fp8"]),
    ("HF fp4 (NVFP4), MoE", ["model=builtin-moe", "rollout.precision=fp4"]),
    ("HF int4 (weight-only), MoE", ["model=builtin-moe", "rollout.precision=int4"]),
    ("HF fp8, MoE, routing replay", ["model=builtin-moe", "rollout.precision=fp8", "train.routing_replay=true"]),
    ("HF fp8, dense, staleness 1", ["rollout.precision=fp8", "rollout.staleness=1"]),
    ("HF fp8, dense, staleness 4", ["rollout.precision=fp8", "rollout.staleness=4"]),
]
COLUMNS = [("mean |r-1|", "mismatch/abs_ratio_dev_mean", "mean"), ("min r", "mismatch/ratio_min", "min"),
           ("max r", "mismatch/ratio_max", "max"), ("k3 KL", "mismatch/kl_k3", "mean"),
           ("mean |pi-mu|", "mismatch/abs_shift_mean", "mean"), ("max |pi-mu|", "mismatch/abs_shift_max", "max"),
           ("|pi-mu|>0.15", None, "mean"), ("router flips", "rollout/router_flip_frac", "mean")]
PUBLISHED = ("published: dense Qwen3-4B (SGLang vs FSDP) mean |r - 1| 0.0049; Qwen3-30B-A3B k3 KL 1.5e-3 vs "
             "6.4e-4 for dense Qwen3-8B; about 10% of the MoE's routing decisions differ")


def measure(overrides: list[str], steps: int, first: int) -> dict[str, float]:
    from drpo.training.config import load_config
    from drpo.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="drpo-calib-") as tmp:
        cfg = load_config(None, [f"out={tmp}/r", "eval.every=0", "save_every=0", "progress=false", "tensorboard=false",
                                 "threads=1", f"train.steps={steps}", *overrides])
        tr = Trainer(cfg)
        rows = [tr.step(i) for i in range(steps)][first:]
        tr.rollout.close()
        tr.life.lock.release()
    out = {}
    for name, key, how in COLUMNS:
        vals = [r["mismatch/beyond_pos_frac"] + r["mismatch/beyond_neg_frac"] for r in rows] if key is None \
            else [r[key] for r in rows if key in r]
        if vals:
            out[name] = min(vals) if how == "min" else max(vals) if how == "max" else sum(vals) / len(vals)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--first", type=int, default=4, help="0-based first measured step")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rows", action="append", default=None, metavar="S",
                   help="only the rows whose label contains S (repeatable); merged into an existing --out")
    a = p.parse_args()
    rows = [(label, ov) for label, ov in ROWS if a.rows is None or any(s in label for s in a.rows)]
    if not rows:
        p.error(f"--rows {a.rows}: no row label contains any of them; labels: {[label for label, _ in ROWS]}")
    kept: dict = {}  # the rows of an existing --out file that this run does not measure
    if a.rows is not None and a.out is not None and a.out.exists():
        old = json.loads(a.out.read_text())
        if (old["steps"], old["first_measured_step"]) != (a.steps, a.first):
            p.error(f"{a.out} was measured with --steps {old['steps']} --first {old['first_measured_step']}; "
                    "rerun the --rows with those, or all rows")
        kept = old["rows"]
    have_vllm = importlib.util.find_spec("vllm") is not None
    results = {}
    for label, ov in rows:
        if "rollout.engine=vllm" in ov and not have_vllm:
            if "overrides" in kept.get(label, {}):  # a measured row is not replaced by a skip
                print(label, "skipped (no vLLM here); kept from", a.out, flush=True)
                continue
            results[label] = {"skipped": "vLLM is not installed here (run with .venv-vllm/bin/python)"}
        else:
            results[label] = {"overrides": ov, "date": datetime.date.today().isoformat(),
                              **measure(ov, a.steps, a.first)}
        print(label, json.dumps(results[label]), flush=True)
    order = [label for label, _ in ROWS]  # the table's order; rows no longer in ROWS go last
    merged = {**kept, **results}
    results = dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    fmt = lambda v: f"{v:.2g}" if abs(v) < 0.01 else f"{v:.4f}"  # noqa: E731
    print("\n| rollout | " + " | ".join(c for c, _, _ in COLUMNS) + " | command overrides |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for label, r in results.items():
        cells = [fmt(r[c]) if c in r else "-" for c, _, _ in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + f" | `{' '.join(r.get('overrides', [])) or r.get('skipped')}` |")
    print("\n" + PUBLISHED)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"steps": a.steps, "first_measured_step": a.first, "rows": results,
                                     "published": PUBLISHED}, indent=2) + "\n")


if __name__ == "__main__":
    main()
