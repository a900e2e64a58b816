"""drpo compare: grid expansion, skip/resume/collapse bookkeeping, the report's verdict logic on
synthetic metrics, and the ``--quick`` CLI path end to end (tiny model, few steps)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

import pytest
from typer.testing import CliRunner

from drpo.cli import app
from drpo.experiments import compare, report
from drpo.experiments import claims as C
from drpo.experiments.grids import (
    DEFAULT_BLOCKS, GRID_BASE, LR_STRESS, METHODS, QUICK_BASE, SETTINGS, Block, build_grid, describe, expand,
)
from drpo.training import run_io
from drpo.training.config import load_config
from drpo.training.trainer import Trainer, TrainingDiverged
from helpers import interrupt_at


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
    shared = sum(expected.values()) - len(slugs)
    assert len(slugs) == len(set(slugs)) and shared == 5  # DRPO x fp8 is in the sync and ablation blocks
    assert all(b.seeds >= 5 for b in g.blocks)
    for r in g.runs:
        cfg = load_config(None, list(r.overrides))
        assert cfg.seed == r.seed and cfg.threads == 1 and cfg.train.steps == 150
    by = {r.setting: load_config(None, list(r.overrides)) for r in g.runs}
    assert by["lr_stress"].train.lr == pytest.approx(LR_STRESS * load_config().train.lr) and LR_STRESS > 1
    assert (by["stale2"].rollout.staleness, by["stale4"].rollout.staleness) == (2, 4)
    assert by["vllm_bf16"].rollout.engine == "vllm" and g.needs_vllm
    assert by["moe_fp8"].model == "builtin-moe" and not by["moe_fp8"].train.routing_replay
    assert by["moe_fp8_replay"].train.routing_replay
    auto = load_config(None, [*METHODS["drpo_auto"].overrides()])
    assert auto.objective.adaptive_delta
    assert load_config(None, [*METHODS["drpo_d0.15"].overrides()]).objective.params == {"delta": 0.15}
    assert {c.id for c in g.claims} == set("abcdefghi")
    for c in g.claims:  # every claim's methods and settings are in the grid
        names = {n for side in (c.treatment, c.control) for x in side for n in x.removeprefix("best:").split(",")}
        assert names <= set(METHODS) and set(c.settings) | {c.control_setting or "fp8"} <= set(SETTINGS), c.id
        assert all(any(r.setting == s for r in g.runs) for s in c.settings), c.id


def test_grid_parameters_resize_and_describe():
    g = build_grid("default", seeds=2, steps=7, blocks=["sync", "ablation"], overrides=["train.lr=2e-4"])
    assert len(g.runs) == 7 * 2 + 4 * 2
    cfg = load_config(None, list(g.runs[0].overrides))
    assert (cfg.train.steps, cfg.train.lr) == (7, 2e-4)
    text = describe(g, seconds_per_run=90, workers=2)
    assert "total: 22 unique runs" in text and "0.28 h" in text
    q = build_grid("quick", overrides=["model=/x"])
    assert [r.slug for r in q.runs] == ["fp8/drpo/seed0", "fp8/drpo/seed1", "fp8/dapo/seed0", "fp8/dapo/seed1",
                                        "stale1/drpo/seed0", "stale1/drpo/seed1", "stale1/dapo/seed0",
                                        "stale1/dapo/seed1"]
    assert load_config(None, list(q.runs[0].overrides)).model == "/x" and not q.needs_vllm
    with pytest.raises(ValueError, match="unknown grid"):
        build_grid("nope")
    with pytest.raises(ValueError, match="no block"):
        build_grid("default", blocks=["nope"])


def test_yaml_grid_with_claims(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("base: [train.steps=3]\nblocks:\n  - {name: b, methods: [drpo, spo], settings: [bf16], seeds: 3}\n"
                 "claims:\n  - e\n  - {id: mine, text: SPO beats DRPO, metric: final_acc, treatment: [spo],"
                 " control: [drpo], settings: [bf16], magnitude: 0.05}\n")
    g = build_grid(str(p))
    assert len(g.runs) == 6 and load_config(None, list(g.runs[0].overrides)).train.steps == 3
    assert [c.id for c in g.claims] == ["e", "mine"] and g.claims[1].magnitude == 0.05
    p.write_text("blocks:\n  - {name: b, methods: [nope], settings: [bf16]}\n")
    with pytest.raises(ValueError, match="unknown method"):
        build_grid(str(p))
    for claims, needle in (("[z]", "unknown claim 'z'"),
                           ("[{id: x, text: t, metric: speed, treatment: [drpo], control: [spo], settings: [bf16]}]",
                            "unknown metric 'speed'"),
                           ("[{id: x, text: t, metric: final_acc, treatment: [drpo], control: [spo], settings: [bf16],"
                            " colour: red}]", "unknown field")):
        p.write_text(f"blocks:\n  - {{name: b, methods: [drpo], settings: [bf16]}}\nclaims: {claims}\n")
        with pytest.raises(ValueError, match=needle):
            build_grid(str(p))


def test_a_grid_with_vllm_settings_needs_vllm(tmp_path):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    res = CliRunner().invoke(app, ["compare", "--out", str(tmp_path / "g"), "--blocks", "vllm"])
    assert res.exit_code == 2 and "has vLLM settings" in res.output and "--blocks" in res.output


# ---------------------------------------------------------------------------- running
def two_run_grid(model_dir: str, steps: int):
    """DRPO and GRPO clip-higher, FP8, one seed each."""
    return expand("t", [Block("b", "", ("drpo", "dapo"), ("fp8",), 1)],
                  GRID_BASE + QUICK_BASE + tuple(tiny(model_dir)) + (f"train.steps={steps}",))


def test_skip_resume_restart_and_collapse_bookkeeping(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    g = two_run_grid(tiny_model_dir, steps=4)
    done, partial = g.runs
    assert [compare.plan(r, out) for r in g.runs] == ["start", "start"]

    # a run interrupted after its step-2 checkpoint, and one that finished
    Trainer(compare.run_config(done, out)).train()
    real_step = Trainer.step
    interrupt_at(monkeypatch, 2)
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
        compare.plan(two_run_grid(tiny_model_dir, steps=5).runs[0], out)

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


# ---------------------------------------------------------------------------- claims and verdicts
def effect(mean, lo, hi, n=5):
    return C.Effect(mean, lo, hi, n, 0.01)


@pytest.mark.parametrize("e,claim,want", [
    (effect(0.05, 0.02, 0.08), "a", "reproduced"),                 # interval above 0, reaches +3 points
    (effect(0.01, 0.005, 0.02), "a", "smaller than claimed"),      # above 0, but excludes +3 points
    (effect(0.0, -0.01, 0.012), "a", "equivalent"),                # within the 3-point margin
    (effect(0.0, -0.04, 0.02), "a", "smaller than claimed"),       # contains 0, rules out +3 points
    (effect(0.0, -0.04, 0.05), "a", "inconclusive"),
    (effect(-0.05, -0.08, -0.02), "a", "contradicted"),
    (effect(0.02, 0.01, 0.03), "b", "reproduced"),                 # no magnitude claimed
    (effect(0.0, -0.01, 0.01), "f", "reproduced"),                 # equivalence inside the margin
    (effect(0.1, 0.05, 0.15), "f", "contradicted"),
    (effect(0.0, -0.05, 0.05), "f", "inconclusive"),
    (effect(-0.005, -0.009, 0.0), "h", "reproduced"),              # non-inferior within 1 point
    (effect(-0.05, -0.08, -0.02), "h", "contradicted"),
    (C.Effect(0.1, float("nan"), float("nan"), 1, float("nan")), "a", "inconclusive"),
])
def test_verdict_rules(e, claim, want):
    assert C.verdict(C.CLAIMS_BY_ID[claim], e) == want


def test_paired_effect_interval_mde_and_log_scale():
    v = [0.01, 0.03, 0.02, 0.05, 0.04]
    e = C.paired_effect(v)
    sd, n = float(np.std(v, ddof=1)), 5
    assert e.mean == pytest.approx(0.03) and e.hi - e.mean == pytest.approx(2.776445 * sd / n ** 0.5, rel=1e-5)
    assert e.mde == pytest.approx((2.776445 + 0.940965) * sd / n ** 0.5, rel=1e-5)
    logs = [math.log(0.75)] * 4 + [math.log(0.8)]  # variance of T is 20-25% below C's
    r = C.paired_effect(logs, log_scale=True)
    assert 0.2 <= r.mean <= 0.25 and r.lo < r.mean < r.hi and r.n == 5


def fake_run(out: Path, grid, method: str, setting: str, seed: int, final: float, *, grad_sd: float = 0.1,
             start: float = 0.3, state: str = "finished", steps: int = 6) -> None:
    """A run directory with a synthetic metrics.jsonl: accuracy goes linearly from ``start`` to ``final``."""
    run = [r for r in grid.runs if (r.method, r.setting, r.seed) == (method, setting, seed)][0]
    d = out / run.slug
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{method}/{setting}/{seed}")
    rows = [{"step": 0, "eval/accuracy": start}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": start + (final - start) * s / steps,
               "train/grad_norm": 1 + grad_sd * (-1) ** s * rng.uniform(0.99, 1.01),
               "mismatch/abs_shift_mean": 0.01, "mismatch/kl_k3": 1e-3, "obj/beyond_pos_frac": 0.02,
               "obj/neg_weight_frac": 0.05, "obj/delta": 12.5 / s}
        for b in report.BUCKETS:
            mu = {"mu<0.01": 0.005, "mu<0.1": 0.05, "mu<0.5": 0.3, "mu>=0.5": 0.8}[b]
            row[f"obj/{b}/abs_shift_mean"] = 0.01 * (1 + rng.random())
            row[f"obj/{b}/abs_ratio_dev_mean"] = row[f"obj/{b}/abs_shift_mean"] / mu
        row["eval/accuracy"] = start + (final - start) * s / steps + 0.001 * rng.random()
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_io.write_status(d, state)


def synthetic_grid(tmp_path, drpo_final, others_final, noise=0.01, drpo_grad_sd=0.1):
    out = tmp_path / "g"
    g = build_grid("default", blocks=["sync", "ablation"])
    out.mkdir(parents=True)
    compare._write_manifest(out, g, {})
    rng = random.Random(0)
    for r in g.runs:
        is_drpo = r.method == "drpo"
        final = (drpo_final if is_drpo else others_final) + noise * rng.uniform(-1, 1)
        fake_run(out, g, r.method, r.setting, r.seed, final, grad_sd=drpo_grad_sd if is_drpo else 0.1)
    return out


def verdict_map(out: Path) -> dict[str, str]:
    manifest, done, _ = report.load_runs(out)
    return {v.claim.id: v.verdict for v in report.verdicts(report.Runs(done), report._claims_of(manifest))
            if not v.claim.per_setting}


def test_report_verdicts_follow_the_data(tmp_path):
    # DRPO 20 points better (others start no faster), gradient-norm variance 25% lower
    v = verdict_map(synthetic_grid(tmp_path / "better", drpo_final=0.6, others_final=0.4,
                                   drpo_grad_sd=0.1 * 0.75 ** 0.5))
    assert v["a"] == v["c"] == v["d"] == v["e"] == v["g"] == "reproduced"
    assert v["f"] == "contradicted"  # delta 2.5 is one of the "others" here: 20 points apart
    # variance 64% lower: lower, and the interval excludes nothing of the claimed 20%: reproduced
    v = verdict_map(synthetic_grid(tmp_path / "much_lower", drpo_final=0.6, others_final=0.4, drpo_grad_sd=0.06))
    assert v["c"] == "reproduced"
    v = verdict_map(synthetic_grid(tmp_path / "equal", drpo_final=0.4, others_final=0.4, noise=0.002))
    assert v["a"] == v["e"] == v["d"] == "equivalent" and v["f"] == "reproduced"
    v = verdict_map(synthetic_grid(tmp_path / "worse", drpo_final=0.3, others_final=0.4, drpo_grad_sd=0.3))
    assert v["a"] == v["c"] == v["d"] == v["e"] == "contradicted"


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
    assert by[("dapo", 0)].final_acc == 0.0 and "fp8/dapo/seed1" in pending
    # final accuracy = mean of the last 3 evaluations
    evals = [v for s, v in by[("drpo", 0)].series("eval/accuracy") if s > 0]
    assert by[("drpo", 0)].final_acc == pytest.approx(sum(evals[-3:]) / 3)
    assert by[("drpo", 0)].steps_to(0.45, 99) == 5 and by[("drpo", 0)].steps_to(0.9, 99) == 99
    (out / "NOTES.md").write_text("Block x was left out: over budget.\n")
    path = report.write_report(out, tmp_path / "rep", "drpo compare --out X --report-only")
    text = path.read_text()
    for needle in ("## Verdicts", "MDE (80%)", "collapse", "Made by `drpo compare --out X --report-only`",
                   "| mu<0.01 |", "not ended", "steps to target", "Block x was left out: over budget."):
        assert needle in text, needle
    n_quick = len(g.runs_by_block[g.blocks[0].name])
    assert f"(3 of {n_quick} runs ended;" in text  # drpo seeds 0 and 1, and the diverged dapo run
    assert (tmp_path / "rep" / "curves_fp8.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "ratio_vs_shift.png").exists()


def test_t_interval():
    e = report.mean_ci([1.0, 2.0, 3.0])
    assert (e.mean, e.n) == (2.0, 3) and e.hi - e.mean == pytest.approx(4.302653 / 3 ** 0.5)
    assert report.t975(1000) == pytest.approx(1.962, abs=1e-3)


# ---------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_quick_runs_the_grid_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "quick"
    args = ["compare", "--quick", "--out", str(out), "--steps", "2", *tiny(tiny_model_dir)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "grid.json").read_text())
    assert [r["state"] for r in manifest["runs"]] == ["finished"] * 8
    rows = run_io.read_metrics(out / "stale1" / "drpo" / "seed0" / "metrics.jsonl")
    assert [r.get("rollout/staleness") for r in rows if r["step"] > 0] == [0, 1]
    assert "grid 'quick'" in res.output and (out / "report" / "README.md").exists()
    res = CliRunner().invoke(app, ["compare", "--out", str(out), "--report-only", "--report", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "## Verdicts" in (tmp_path / "r" / "README.md").read_text()
    res = CliRunner().invoke(app, ["compare", "--out", str(tmp_path / "empty"), "--report-only"])
    assert res.exit_code == 2 and "run the grid first" in res.output
    res = CliRunner().invoke(app, ["compare", "--estimate", "60", "--seeds", "5"])
    assert res.exit_code == 0 and f"total: {len(build_grid('default').runs)} unique runs" in res.output
