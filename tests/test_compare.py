"""drpo compare: grid expansion, skip/resume/collapse bookkeeping, the report's verdict logic on
synthetic metrics, and the ``--quick`` CLI path end to end (tiny model, few steps)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drpo.cli import app
from drpo.experiments import compare, report
from drpo.experiments.grids import DEFAULT_BLOCKS, LR_STRESS, METHODS, SETTINGS, build_grid, describe
from drpo.training import run_io
from drpo.training.config import load_config
from drpo.training.trainer import Trainer, TrainingDiverged


def tiny(model_dir: str) -> list[str]:
    """Overrides that make a grid run take about a second."""
    return [f"model={model_dir}", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "eval.prompts=8", "eval.every=2", "save_every=2", "train.lr=1e-3"]


# ---------------------------------------------------------------------------- grids
def test_default_grid_counts_unique_dirs_and_valid_overrides():
    g = build_grid("default")
    expected = {b.name: len(b.methods) * len(b.settings) * b.seeds for b in DEFAULT_BLOCKS}
    assert {k: len(v) for k, v in g.runs_by_block.items()} == expected
    slugs = [r.slug for r in g.runs]
    assert len(slugs) == len(set(slugs)) == 140  # shared runs (DRPO x fp8 in main/ablation/delta) run once
    assert all(b.seeds >= 5 for b in g.blocks)
    for r in g.runs:
        cfg = load_config(None, list(r.overrides))
        assert cfg.seed == r.seed and cfg.threads == 1
    stress = [r for r in g.runs if r.setting == "fp8_lr_stress"][0]
    assert load_config(None, list(stress.overrides)).train.lr == pytest.approx(LR_STRESS * load_config().train.lr)
    assert LR_STRESS > 1
    e2e = [r for r in g.runs if r.setting == "fp8_e2e"][0]
    cfg = load_config(None, list(e2e.overrides))
    assert (cfg.rollout.precision, cfg.train.precision) == ("fp8", "bf16")
    drpo015 = load_config(None, [*METHODS["drpo_d0.15"].overrides()])
    assert drpo015.objective.params == {"delta": 0.15}
    assert set(SETTINGS) >= {"bf16", "fp8", "fp8_e2e", "fp8_k1", "fp8_k8"}


def test_grid_parameters_resize_and_describe():
    g = build_grid("default", seeds=2, steps=7, blocks=["main", "delta"], overrides=["train.lr=2e-4"])
    assert len(g.runs) == 7 * 2 + 2 * 2  # delta adds drpo_d0.5 and drpo_d2.5; the other two are in main
    cfg = load_config(None, list(g.runs[0].overrides))
    assert (cfg.train.steps, cfg.train.lr) == (7, 2e-4)
    text = describe(g, seconds_per_run=90, workers=2)
    assert "total: 18 unique runs" in text and "0.23 h" in text
    q = build_grid("quick", overrides=["model=/x"])
    assert [r.slug for r in q.runs] == ["fp8/drpo/seed0", "fp8/drpo/seed1", "fp8/dapo/seed0", "fp8/dapo/seed1"]
    assert load_config(None, list(q.runs[0].overrides)).model == "/x"
    with pytest.raises(ValueError, match="unknown grid"):
        build_grid("nope")
    with pytest.raises(ValueError, match="no block"):
        build_grid("default", blocks=["nope"])


def test_yaml_grid(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("base: [train.steps=3]\nblocks:\n  - {name: b, methods: [drpo, spo], settings: [bf16], seeds: 3}\n")
    g = build_grid(str(p))
    assert len(g.runs) == 6 and load_config(None, list(g.runs[0].overrides)).train.steps == 3
    p.write_text("blocks:\n  - {name: b, methods: [nope], settings: [bf16]}\n")
    with pytest.raises(ValueError, match="unknown method"):
        build_grid(str(p))


# ---------------------------------------------------------------------------- running
def test_skip_resume_restart_and_collapse_bookkeeping(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    g = build_grid("quick", seeds=1, steps=4, overrides=tiny(tiny_model_dir))
    done, partial = g.runs
    assert [compare.plan(r, out) for r in g.runs] == ["start", "start"]

    # a run interrupted after its step-2 checkpoint, and one that finished
    Trainer(compare.run_config(done, out)).train()
    real_step = Trainer.step

    def interrupted(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(compare.run_config(partial, out)).train()
    monkeypatch.setattr(Trainer, "step", real_step)
    assert [compare.plan(r, out) for r in g.runs] == ["skip", "resume"]

    calls = []
    real_init = Trainer.__init__

    def spy(self, cfg, *, resume=False):
        calls.append((Path(cfg.out).relative_to(out).as_posix(), resume))
        real_init(self, cfg, resume=resume)

    monkeypatch.setattr(Trainer, "__init__", spy)
    entries = compare.run_grid(g, out)
    assert calls == [(partial.slug, True)]  # the finished run is skipped, the partial one resumed
    assert {e["state"] for e in entries.values()} == {"finished"}
    assert [r["step"] for r in run_io.read_metrics(out / partial.slug / "metrics.jsonl")] == [0, 1, 2, 3, 4]

    # another configuration in the same folder is refused, not mixed in
    with pytest.raises(ValueError, match="another configuration"):
        compare.plan(build_grid("quick", seeds=1, steps=5, overrides=tiny(tiny_model_dir)).runs[0], out)

    # no checkpoint yet -> moved aside and started again; a divergence is recorded, the grid goes on
    (out / done.slug / "checkpoints").rename(out / "ckpt")
    run_io.write_status(out / done.slug, "running", step=1)
    assert compare.plan(done, out) == "restart"
    calls.clear()

    def diverge(self, step):
        if self.cfg.objective.name == "drpo":
            raise TrainingDiverged("step 0: the loss is nan")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "step", diverge)
    entries = compare.run_grid(g, out)
    assert calls == [(done.slug, False)]
    assert entries[done.slug]["state"] == "failed" and "nan" in entries[done.slug]["reason"]
    assert (out / (done.slug + ".aborted") / "metrics.jsonl").exists()
    manifest = json.loads((out / "grid.json").read_text())
    assert {r["slug"]: r["state"] for r in manifest["runs"]} == {done.slug: "failed", partial.slug: "finished"}
    assert compare.plan(done, out) == "skip"  # a diverged run is a result, not re-run


# ---------------------------------------------------------------------------- report
def fake_run(out: Path, grid, method: str, setting: str, seed: int, final: float, *, grad_sd: float = 0.1,
             start: float = 0.3, state: str = "finished", steps: int = 6) -> None:
    """A run directory with a synthetic metrics.jsonl: accuracy goes linearly from ``start`` to ``final``."""
    run = [r for r in grid.runs if (r.method, r.setting, r.seed) == (method, setting, seed)][0]
    d = out / run.slug
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{method}/{setting}/{seed}")
    rows = [{"step": 0, "eval/accuracy": start}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": start + (final - start) * s / steps, "train/grad_norm": 1 + grad_sd * (-1) ** s * rng.uniform(0.99, 1.01),
               "mismatch/abs_shift_mean": 0.01, "mismatch/kl_k3": 1e-3, "obj/beyond_pos_frac": 0.02,
               "obj/neg_weight_frac": 0.05}
        for b in report.BUCKETS:
            mu = {"mu<0.01": 0.005, "mu<0.1": 0.05, "mu<0.5": 0.3, "mu>=0.5": 0.8}[b]
            row[f"obj/{b}/abs_shift_mean"] = 0.01 * (1 + rng.random())
            row[f"obj/{b}/abs_ratio_dev_mean"] = row[f"obj/{b}/abs_shift_mean"] / mu
        if s % 2 == 0 or s == steps:
            row["eval/accuracy"] = start + (final - start) * s / steps
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_io.write_status(d, state)


def synthetic_grid(tmp_path, drpo_final, others_final, noise=0.01, drpo_grad_sd=0.1):
    out = tmp_path / "g"
    g = build_grid("default", blocks=["main", "ablation", "delta", "precision"])
    out.mkdir(parents=True)
    compare._write_manifest(out, g, {})
    rng = random.Random(0)
    for r in g.runs:
        if r.method == "drpo":
            final = drpo_final
        elif r.method == "drpo_d2.5":
            final = drpo_final + rng.uniform(-noise, noise)
        else:
            final = others_final + rng.uniform(-noise, noise)
        if r.setting == "bf16" and r.method in report.RATIO_BASED:
            final += 0.1  # ratio-based methods lose 10 points from BF16 to FP8 ...
        if r.setting == "bf16" and r.method == "drpo":
            final += 0.01  # ... DRPO one
        sd = drpo_grad_sd if r.method == "drpo" else 0.1
        fake_run(out, g, r.method, r.setting, r.seed, final + rng.uniform(-noise, noise), grad_sd=sd)
    return out


def verdict_map(out: Path) -> dict[str, str]:
    _, done, _ = report.load_runs(out)
    return {v.claim[:3]: v.verdict for v in report.verdicts(report.Runs(done), build_grid().to_dict()["methods"])}


def test_report_verdicts_follow_the_data(tmp_path):
    # DRPO clearly better, gradient-norm variance 25% lower
    out = synthetic_grid(tmp_path / "better", drpo_final=0.6, others_final=0.4, drpo_grad_sd=0.1 * 0.75 ** 0.5)
    assert set(verdict_map(out).values()) == {"reproduced"}

    # variance 64% lower: lower, but not by the claimed 20-30%
    out = synthetic_grid(tmp_path / "much_lower", drpo_final=0.6, others_final=0.4, drpo_grad_sd=0.06)
    assert verdict_map(out)["(c)"] == "not reproduced"

    out = synthetic_grid(tmp_path / "equal", drpo_final=0.4, others_final=0.4, noise=0.02)
    v = verdict_map(out)
    assert v["(a)"] == v["(d)"] == v["(e)"] == "inconclusive"

    out = synthetic_grid(tmp_path / "worse", drpo_final=0.3, others_final=0.4, drpo_grad_sd=0.3)
    v = verdict_map(out)
    assert v["(a)"] == v["(c)"] == v["(d)"] == v["(e)"] == "not reproduced"


def test_collapse_definition_and_report_files(tmp_path):
    g = build_grid("quick")
    out = tmp_path / "g"
    out.mkdir()
    compare._write_manifest(out, g, {})
    fake_run(out, g, "drpo", "fp8", 0, final=0.5)
    fake_run(out, g, "drpo", "fp8", 1, final=0.1)  # below half its start: collapse
    fake_run(out, g, "dapo", "fp8", 0, final=0.3, state="failed")  # diverged: collapse, final acc 0
    _, done, pending = report.load_runs(out)
    by = {(r.method, r.seed): r for r in done}
    assert [by[("drpo", 0)].collapsed, by[("drpo", 1)].collapsed, by[("dapo", 0)].collapsed] == [False, True, True]
    assert by[("dapo", 0)].final_acc == 0.0 and pending == ["fp8/dapo/seed1"]
    path = report.write_report(out, tmp_path / "rep", "drpo compare --out X --report-only")
    text = path.read_text()
    for needle in ("## Verdicts", "collapse", "Made by `drpo compare --out X --report-only`", "| mu<0.01 |",
                   "not ended"):
        assert needle in text, needle
    assert (tmp_path / "rep" / "curves_quick_fp8.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "ratio_vs_shift.png").exists()


def test_t_interval():
    e = report.mean_ci([1.0, 2.0, 3.0])
    assert (e.mean, e.n) == (2.0, 3) and e.hi - e.mean == pytest.approx(4.303 / 3 ** 0.5)
    assert report.directional(report.mean_ci([0.1])) == "inconclusive"
    assert report.t975(1000) == pytest.approx(1.962, abs=1e-3)


# ---------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_quick_runs_the_grid_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "quick"
    args = ["compare", "--quick", "--out", str(out), "--steps", "2", *tiny(tiny_model_dir)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "grid.json").read_text())
    assert [r["state"] for r in manifest["runs"]] == ["finished"] * 4
    assert "grid 'quick'" in res.output and (out / "report" / "README.md").exists()
    res = CliRunner().invoke(app, ["compare", "--out", str(out), "--report-only", "--report", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "## Verdicts" in (tmp_path / "r" / "README.md").read_text()
    res = CliRunner().invoke(app, ["compare", "--out", str(tmp_path / "empty"), "--report-only"])
    assert res.exit_code == 2 and "run the grid first" in res.output
    res = CliRunner().invoke(app, ["compare", "--estimate", "60", "--seeds", "5"])
    assert res.exit_code == 0 and "total: 140 unique runs" in res.output
