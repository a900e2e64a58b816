"""drpo compare: grid expansion, skip/resume/collapse bookkeeping, the report's verdict logic on
synthetic metrics, and the ``--quick`` CLI path end to end (tiny model, few steps)."""
from __future__ import annotations

import json
import re
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import pytest
from typer.testing import CliRunner

from drpo.cli import app
from drpo.experiments import compare, effects, report, results
from drpo.experiments import claims as C
from drpo.experiments import stats as S
from drpo.experiments.grids import (
    DECIDE_SEEDS, DECIDE_STEPS, GRID_BASE, MAP_METHODS, MAP_SEEDS, MAP_STEPS, QUICK_BASE, Block, build_grid, describe,
    expand,
)
from drpo.experiments.selection import choose_cells
from drpo.experiments.study import CALM, LR_EXTENSION, LR_LADDER, SETTINGS, STALE_LADDER, Cell
from drpo.training import run_io
from drpo.training.config import load_config
from drpo.training.lifecycle import TrainingDiverged
from drpo.training.trainer import Trainer
from helpers import interrupt_at


def cell(lr: float, staleness: int, precision: str) -> str:
    return Cell(lr, staleness, precision).name


def tiny(model_dir: str) -> list[str]:
    """Overrides that make a grid run take about a second."""
    return [f"model={model_dir}", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "eval.prompts=8", "eval.every=2", "save_every=2", "train.lr=1e-3",
            "train.stop_on_collapse=false"]  # the random tiny model rarely ends a response: "collapsed" from the start


# ---------------------------------------------------------------------------- grids
def test_map_grid_cells_seeds_and_overrides():
    g = build_grid("map")
    cells = {r.setting for r in g.runs}
    assert len(cells) == len(LR_LADDER) * len(STALE_LADDER) + len(LR_LADDER)  # lr x staleness at FP8, + FP4 row
    assert len(g.runs) == len(cells) * len(MAP_METHODS) * len(MAP_SEEDS)
    assert {r.seed for r in g.runs} == set(MAP_SEEDS) and not set(MAP_SEEDS) & set(DECIDE_SEEDS)
    assert set(g.runs_by_block) == {"map_fp8", "map_fp4"} and "pg_is" in MAP_METHODS
    for r in g.runs:
        cfg = load_config(None, list(r.overrides))
        c = SETTINGS[r.setting].cell
        assert (cfg.train.lr, cfg.rollout.staleness, cfg.rollout.precision) == (c.lr, c.staleness, c.precision)
        assert cfg.seed == r.seed and cfg.threads == 1 and cfg.train.steps == MAP_STEPS
        assert cfg.train.overlong_reward == 0 and cfg.train.stop_on_collapse
    assert SETTINGS[CALM].cell.lr == load_config().train.lr and SETTINGS[CALM].cell.staleness == 0  # the default run's
    assert Cell(3e-4, 4, "fp8").rank == 2 and Cell(1e-4, 0, "fp4").rank == 1 and Cell(1e-2, 16, "fp4").rank == 7
    ext = build_grid("map-ext")
    assert {SETTINGS[r.setting].cell.lr for r in ext.runs} == set(LR_LADDER) | {LR_EXTENSION}
    assert g.kind == ext.kind == "map" and build_grid("quick").kind == "quick"


def test_grid_parameters_resize_and_describe():
    g = build_grid("map", seeds=1, steps=7, blocks=["map_fp4"], overrides=["eval.prompts=32"])
    assert len(g.runs) == len(LR_LADDER) * len(MAP_METHODS) and {r.seed for r in g.runs} == {MAP_SEEDS[0]}
    cfg = load_config(None, list(g.runs[0].overrides))
    assert (cfg.train.steps, cfg.eval.prompts, cfg.rollout.precision) == (7, 32, "fp4")
    text = describe(g, seconds_per_run=90, workers=2)
    assert f"total: {len(g.runs)} unique runs" in text and f"{len(g.runs) * 90 / 2 / 3600:.2f} h" in text
    q = build_grid("quick", overrides=["model=/x"])
    assert [r.slug for r in q.runs] == ["fp8/drpo/seed0", "fp8/drpo/seed1", "fp8/dapo/seed0", "fp8/dapo/seed1",
                                        "stale1/drpo/seed0", "stale1/drpo/seed1", "stale1/dapo/seed0",
                                        "stale1/dapo/seed1"]
    assert load_config(None, list(q.runs[0].overrides)).model == "/x" and not q.needs_vllm
    for kw, needle in (({"name": "nope"}, "unknown grid"), ({"blocks": ["nope"]}, "no block"),
                       ({"name": "decide"}, "needs the finished stability map"),
                       ({"map_dir": Path("/x")}, "--map is for --grid decide only"),
                       ({"overrides": ["eval.prompts=-1"]}, "eval.prompts")):
        with pytest.raises(ValueError, match=needle):
            build_grid(**kw)


def test_yaml_grid_with_claims(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("base: [train.steps=3]\nblocks:\n  - {name: b, methods: [drpo, spo], settings: [fp8], seeds: 3}\n"
                 "claims:\n  - {id: mine, text: SPO beats DRPO, metric: final_acc, treatment: [spo],"
                 " control: [drpo], settings: [fp8], magnitude: 0.05}\n")
    g = build_grid(str(p))
    assert len(g.runs) == 6 and load_config(None, list(g.runs[0].overrides)).train.steps == 3
    assert [c.id for c in g.claims] == ["mine"] and g.claims[0].magnitude == 0.05
    p.write_text("blocks:\n  - {name: b, methods: [nope], settings: [fp8]}\n")
    with pytest.raises(ValueError, match="unknown method"):
        build_grid(str(p))
    for claims, needle in (("[z]", "a claim is a mapping"),
                           ("[{id: x, text: t, metric: speed, treatment: [drpo], control: [spo], settings: [fp8]}]",
                            "unknown metric 'speed'"),
                           ("[{id: x, text: t, metric: collapse, treatment: [drpo], control: [spo], settings: [fp8]}]",
                            "the collapse metric goes with the rule 'fewer'"),
                           ("[{id: x, text: t, metric: final_acc, treatment: [drpo], control: [spo], settings: [fp8],"
                            " colour: red}]", "unknown field")):
        p.write_text(f"blocks:\n  - {{name: b, methods: [drpo], settings: [fp8]}}\nclaims: {claims}\n")
        with pytest.raises(ValueError, match=needle):
            build_grid(str(p))


def test_a_grid_with_vllm_settings_needs_vllm(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    p = tmp_path / "g.yaml"
    p.write_text("blocks:\n  - {name: v, methods: [drpo], settings: [vllm_bf16], seeds: 1}\n")
    res = CliRunner().invoke(app, ["compare", "--grid", str(p), "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "has vLLM settings" in res.output and "--blocks" in res.output


# ---------------------------------------------------------------------------- the stage-2 rule
def fake_map(out: Path, pg_is: dict[str, int], others: int = 0) -> Path:
    """A finished stability map whose PG-IS runs collapse in ``pg_is[cell]`` of the seeds (0 elsewhere)
    and every other method's in ``others`` of them."""
    g = build_grid("map-ext" if any(SETTINGS[c].cell.lr == LR_EXTENSION for c in pg_is) else "map")
    out.mkdir(parents=True, exist_ok=True)
    for r in g.runs:
        k = pg_is.get(r.setting, 0) if r.method == "pg_is" else others
        fake_run(out, g, r.method, r.setting, r.seed, final=0.05 if r.seed - MAP_SEEDS[0] < k else 0.5, start=0.25)
    compare.write_manifest(out, g)
    return out


def test_the_rule_picks_the_mildest_positive_control_and_one_rung_harder(tmp_path):
    n = len(MAP_SEEDS)
    m = fake_map(tmp_path / "m", {cell(1e-3, 0, "fp8"): n, cell(3e-4, 4, "fp8"): n, cell(3e-4, 0, "fp8"): 1,
                                  cell(3e-3, 16, "fp8"): n})
    choice = choose_cells(m)
    # rank 2 for both lr1e-3/s0 and lr3e-4/s4: the lower learning rate wins the tie; B: one lr rung up
    assert choice.stressed == (cell(3e-4, 4, "fp8"), cell(1e-3, 4, "fp8")) and choice.positive_control
    assert "cell A (mildest) = lr3e-4_s4_fp8" in choice.notes[1]
    # the other methods' results do not change the choice
    assert choose_cells(fake_map(tmp_path / "m2", {cell(1e-3, 0, "fp8"): n, cell(3e-4, 4, "fp8"): n,
                                                  cell(3e-3, 16, "fp8"): n}, others=n)).stressed == choice.stressed
    # on the top lr rung, B is one staleness rung up; on the top of both, there is no B
    assert choose_cells(fake_map(tmp_path / "m3", {cell(3e-3, 0, "fp8"): n})).stressed == (
        cell(3e-3, 0, "fp8"), cell(3e-3, 4, "fp8"))
    assert choose_cells(fake_map(tmp_path / "m4", {cell(3e-3, 16, "fp8"): n})).stressed == (cell(3e-3, 16, "fp8"),)
    # the 4-bit row is one rank up: fp4 at 1e-4 (rank 1) beats fp8 at 3e-4 / s4 (rank 2)
    assert choose_cells(fake_map(tmp_path / "m5", {cell(1e-4, 0, "fp4"): n, cell(3e-4, 4, "fp8"): n})).stressed[0] \
        == cell(1e-4, 0, "fp4")


def test_no_positive_control_extends_the_map_then_says_so(tmp_path):
    m = fake_map(tmp_path / "m", {cell(1e-3, 16, "fp8"): 1, cell(3e-3, 16, "fp8"): 1})
    with pytest.raises(ValueError, match="--grid map-ext"):
        choose_cells(m)
    ext = fake_map(tmp_path / "e", {cell(1e-3, 16, "fp8"): 1, cell(LR_EXTENSION, 16, "fp8"): 1,
                                    cell(LR_EXTENSION, 0, "fp8"): 1})
    choice = choose_cells(ext)
    assert not choice.positive_control and "NO POSITIVE CONTROL" in choice.notes[-1]
    assert choice.stressed == (cell(LR_EXTENSION, 16, "fp8"), cell(1e-3, 16, "fp8"))  # most, then higher rank


def test_the_rule_waits_for_every_pg_is_run(tmp_path):
    m = fake_map(tmp_path / "m", {cell(1e-3, 0, "fp8"): len(MAP_SEEDS)})
    slug = next(r.slug for r in build_grid("map").runs if r.method == "pg_is")
    run_io.write_status(m / slug, "interrupted")
    with pytest.raises(ValueError, match="have not ended"):
        choose_cells(m)


def test_decide_grid_blocks_seeds_and_claims(tmp_path):
    n = len(MAP_SEEDS)
    m = fake_map(tmp_path / "m", {cell(3e-4, 0, "fp8"): n})
    g = build_grid("decide", map_dir=m)
    # the lr-stress block (lr x3) is not in the study: cut on budget, never run (the map holds that cell)
    assert [b.name for b in g.blocks] == ["calm", "stressed", "replay", "replay_control"] and g.kind == "decide"
    assert g.blocks[1].settings == (cell(3e-4, 0, "fp8"), cell(1e-3, 0, "fp8"))
    assert {r.seed for r in g.runs} == set(DECIDE_SEEDS) and len(DECIDE_SEEDS) >= 5
    assert all(load_config(None, list(r.overrides)).train.steps == DECIDE_STEPS for r in g.runs)
    assert len(g.runs) == 8 * 5 * 3 + 5 + 5 and g.choice is not None and g.choice.stressed == g.blocks[1].settings
    by = {(c.id, c.regime): c for c in g.claims}
    assert by[("b", "stressed")].metric == "collapse" and by[("b", "stressed")].settings == g.blocks[1].settings
    assert by[("j", "calm")].rule == "equivalence" and by[("j", "calm")].control == ("pg_is",)
    assert by[("i", "")].control_setting == "moe_fp8_replay"
    for c in g.claims:  # every claim's methods and settings are in the grid
        names = {n for side in (c.treatment, c.control) for x in side for n in x.removeprefix("best:").split(",")}
        assert all(any(r.setting == s and r.method in names for r in g.runs) for s in c.settings), c.id
    assert any("cell A" in n for n in g.notes)


# ---------------------------------------------------------------------------- running
def two_run_grid(model_dir: str, steps: int):
    """DRPO and GRPO clip-higher, FP8, one seed each."""
    return expand("t", [Block("b", "", ("drpo", "dapo"), ("fp8",), (0,))],
                  GRID_BASE + QUICK_BASE + tuple(tiny(model_dir)) + (f"train.steps={steps}",))


@pytest.mark.slow
def test_skip_resume_restart_and_states_on_disk(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    g = two_run_grid(tiny_model_dir, steps=4)
    done, partial = g.runs
    assert [compare.plan(r, out) for r in g.runs] == ["start", "start"]

    # a run interrupted after its step-2 checkpoint, and one that finished
    Trainer(compare.run_config(done, out)).train()
    interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(compare.run_config(partial, out)).train()
    monkeypatch.undo()
    assert [compare.plan(r, out) for r in g.runs] == ["skip", "resume"]
    finished_rows = (out / done.slug / "metrics.jsonl").read_text()

    entries = compare.run_grid(g, out)  # each run in a fresh process
    assert {e["state"] for e in entries.values()} == {"finished"}
    assert (out / done.slug / "metrics.jsonl").read_text() == finished_rows  # skipped, untouched
    assert [r["step"] for r in run_io.read_metrics(out / partial.slug / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    manifest = json.loads((out / "grid.json").read_text())
    assert {r["slug"]: r["state"] for r in manifest["runs"]} == {done.slug: "finished", partial.slug: "finished"}

    # another configuration in the same folder is refused, not mixed in
    with pytest.raises(ValueError, match="another configuration"):
        compare.plan(two_run_grid(tiny_model_dir, steps=5).runs[0], out)

    # what the status says decides: results are skipped, the rest resumed (or restarted without a checkpoint)
    for state, info, want in (("failed", {"cause": "diverged"}, "skip"), ("collapsed", {}, "skip"),
                              ("failed", {"cause": "rollout_worker"}, "resume"), ("error", {}, "resume"),
                              ("failed", {"cause": "exception"}, "resume"), ("running", {}, "resume")):
        run_io.write_status(out / done.slug, state, **info)
        assert compare.plan(done, out) == want, (state, info)
    (out / done.slug / "checkpoints").rename(out / "ckpt")
    assert compare.plan(done, out) == "restart"
    compare.execute(done, out, "restart")  # moved aside, run again from step 0
    assert (out / (done.slug + ".aborted") / "metrics.jsonl").exists()
    assert run_io.read_status(out / done.slug)["state"] == "finished"


@pytest.mark.slow
def test_a_run_folder_in_use_is_never_moved(tiny_model_dir, tmp_path):
    out = tmp_path / "grid"
    run = two_run_grid(tiny_model_dir, steps=2).runs[0]
    (out / run.slug).mkdir(parents=True)
    held = run_io.RunLock(out / run.slug)  # another process's run, say
    try:
        compare.execute(run, out, "restart")
        assert (out / run.slug).exists() and not (out / (run.slug + ".aborted")).exists()
    finally:
        held.release()


# ---------------------------------------------------------------------------- claims and verdicts
def effect(mean, lo, hi, n=5):
    return S.Effect(mean, lo, hi, n, 0.01)


CLAIMS = {(c.id, c.regime): c for c in C.decide_claims(CALM, (cell(1e-3, 0, "fp8"),))}


@pytest.mark.parametrize("e,claim,want", [
    (effect(0.05, 0.02, 0.08), "a", "reproduced"),                 # interval above 0, reaches +3 points
    (effect(0.01, 0.005, 0.02), "a", "smaller than claimed"),      # above 0, but excludes +3 points
    (effect(0.0, -0.01, 0.012), "a", "equivalent"),                # within the 3-point margin
    (effect(0.0, -0.04, 0.02), "a", "smaller than claimed"),       # contains 0, rules out +3 points
    (effect(0.0, -0.04, 0.05), "a", "inconclusive"),
    (effect(-0.05, -0.08, -0.02), "a", "contradicted"),
    (effect(0.02, 0.01, 0.03), "d", "reproduced"),                 # no magnitude claimed
    (effect(0.0, -0.01, 0.01), "j", "reproduced"),                 # equivalence inside the margin
    (effect(0.1, 0.05, 0.15), "j", "contradicted"),
    (effect(0.0, -0.05, 0.05), "j", "inconclusive"),
    (effect(-0.005, -0.009, 0.0), "h", "reproduced"),              # non-inferior within 1 point
    (effect(-0.05, -0.08, -0.02), "h", "contradicted"),
    (S.Effect(0.1, float("nan"), float("nan"), 1, float("nan")), "a", "inconclusive"),
    (S.count_effect(0, 10, 9, 10), "b", "reproduced"),              # 0/10 vs 9/10 collapsed
    (S.count_effect(9, 10, 0, 10), "b", "contradicted"),
    (S.count_effect(2, 10, 4, 10), "b", "inconclusive"),
    (S.count_effect(0, 10, 0, 20), "b", "no collapse"),
    (S.count_effect(0, 0, 0, 0), "b", "not tested"),
])
def test_verdict_rules(e, claim, want):
    assert C.verdict(CLAIMS[(claim, "stressed")], e) == want


def test_paired_effect_interval_mde_and_log_scale():
    v = [0.01, 0.03, 0.02, 0.05, 0.04]
    e = S.paired_effect(v)
    sd, n = float(np.std(v, ddof=1)), 5
    assert e.mean == pytest.approx(0.03) and e.hi - e.mean == pytest.approx(2.776445 * sd / n ** 0.5, rel=1e-5)
    assert e.mde == pytest.approx((2.776445 + 0.940965) * sd / n ** 0.5, rel=1e-5)
    logs = [math.log(0.75)] * 4 + [math.log(0.8)]  # variance of T is 20-25% below C's
    r = S.paired_effect(logs, log_scale=True)
    assert 0.2 <= r.mean <= 0.25 and r.lo < r.mean < r.hi and r.n == 5


def test_count_effect_exact_test_interval_and_mde():
    from scipy import stats

    e = S.count_effect(1, 10, 8, 20)  # treatment 1/10 collapsed, control 8/20
    assert e.mean == pytest.approx(8 / 20 - 1 / 10) and e.lo < e.mean < e.hi and e.n == 30
    assert e.p_less == pytest.approx(stats.fisher_exact([[1, 9], [8, 12]], alternative="less")[1])
    assert e.p_greater == pytest.approx(stats.fisher_exact([[8, 12], [1, 9]], alternative="less")[1])
    # Newcombe's hybrid score interval, his worked example (56/70 vs 48/80): 0.0524 to 0.3339
    lo, hi = S.newcombe(56, 70, 48, 80)
    assert (lo, hi) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))
    # MDE: more runs detect smaller reductions; a control that never collapses gives no MDE
    assert S.count_mde(10, 0.8, 20) > S.count_mde(40, 0.8, 80) > 0
    assert math.isnan(S.count_mde(10, 0.0, 20))
    # the power behind the MDE: against 8/20 even a treatment that never collapses is not detected with
    # 80% power at these n (p = 0.03 for 0/10 vs 8/20, but often fewer control collapses are drawn)
    assert S.count_mde(10, 0.4, 20) == math.inf and 0 < S.count_mde(10, 0.9, 20) < 0.9


def test_t_interval():
    e = S.mean_ci([1.0, 2.0, 3.0])
    assert (e.mean, e.n) == (2.0, 3) and e.hi - e.mean == pytest.approx(4.302653 / 3 ** 0.5)
    assert S.t_quantile(0.975, 1000) == pytest.approx(1.962, abs=1e-3)


def fake_run(out: Path, grid, method: str, setting: str, seed: int, final: float, *, grad_sd: float = 0.1,
             start: float = 0.3, state: str = "finished", steps: int = 6, **status) -> None:
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
    run_io.write_status(d, state, **status)


def synthetic_decide(tmp_path, drpo_final, others_final, noise=0.01, drpo_grad_sd=0.1, collapse=()):
    """A finished stage-2 grid (calm and stressed blocks) of synthetic runs, and its map; the methods in
    ``collapse`` collapse in every seed of the stressed cells."""
    m = fake_map(tmp_path / "map", {cell(1e-3, 0, "fp8"): len(MAP_SEEDS)})
    out = tmp_path / "g"
    g = build_grid("decide", map_dir=m, blocks=["calm", "stressed"])
    rng = random.Random(0)
    for r in g.runs:
        is_drpo = r.method == "drpo"
        final = (drpo_final if is_drpo else others_final) + noise * rng.uniform(-1, 1)
        if r.method in collapse and r.setting != CALM:
            final = 0.05
        fake_run(out, g, r.method, r.setting, r.seed, final, grad_sd=drpo_grad_sd if is_drpo else 0.1)
    compare.write_manifest(out, g)
    return out, m


def verdict_map(out: Path) -> dict[tuple[str, str], str]:
    manifest, done, _ = results.load_runs(out)
    claims = tuple(C.Claim.from_dict(d) for d in manifest["claims"])
    return {(v.claim.id, v.claim.regime): v.verdict for v in effects.verdicts(results.Runs(done), claims)
            if not v.claim.per_setting}


def test_report_verdicts_follow_the_data(tmp_path):
    # DRPO 20 points better (others start no faster), gradient-norm variance 25% lower
    v = verdict_map(synthetic_decide(tmp_path / "better", drpo_final=0.6, others_final=0.4,
                                     drpo_grad_sd=0.1 * 0.75 ** 0.5)[0])
    for claim in "acdeg":
        assert v[(claim, "calm")] == "reproduced", claim
    assert v[("j", "calm")] == "contradicted"  # 20 points from PG-IS: not alike
    assert v[("b", "calm")] == v[("k", "calm")] == "no collapse" and v[("i", "")] == "not tested"
    v = verdict_map(synthetic_decide(tmp_path / "equal", drpo_final=0.4, others_final=0.4, noise=0.002)[0])
    assert v[("a", "calm")] == v[("e", "calm")] == v[("d", "calm")] == "equivalent" and v[("j", "calm")] == "reproduced"
    v = verdict_map(synthetic_decide(tmp_path / "worse", drpo_final=0.3, others_final=0.4, drpo_grad_sd=0.3)[0])
    for claim in "acde":
        assert v[(claim, "calm")] == "contradicted", claim
    # in the stressed cells PG-IS and the ratio methods collapse in every seed, DRPO never
    v = verdict_map(synthetic_decide(tmp_path / "stress", drpo_final=0.4, others_final=0.4,
                                     collapse=("pg_is", "dapo", "spo"))[0])
    assert v[("b", "stressed")] == v[("k", "stressed")] == "reproduced" and v[("b", "calm")] == "no collapse"


def test_collapse_definition_and_report_files(tmp_path):
    g = build_grid("quick")
    out = tmp_path / "g"
    out.mkdir()
    fake_run(out, g, "drpo", "fp8", 0, final=0.5)
    fake_run(out, g, "drpo", "fp8", 1, final=0.1)  # below half its start: collapse
    fake_run(out, g, "dapo", "fp8", 0, final=0.3, state="failed", cause="diverged")  # diverged: collapse, acc 0
    fake_run(out, g, "dapo", "fp8", 1, final=0.3, state="failed", cause="rollout_worker")  # not a result
    compare.write_manifest(out, g)
    _, done, pending = results.load_runs(out)
    by = {(r.method, r.seed): r for r in done}
    assert [by[("drpo", 0)].collapsed, by[("drpo", 1)].collapsed, by[("dapo", 0)].collapsed] == [False, True, True]
    assert by[("drpo", 1)].collapse.began == 5 and not by[("drpo", 1)].collapse.recovered
    assert by[("dapo", 0)].final_acc == 0.0 and "fp8/dapo/seed1" in pending
    # final accuracy = mean of the last 3 evaluations
    evals = [v for s, v in by[("drpo", 0)].series("eval/accuracy") if s > 0]
    assert by[("drpo", 0)].final_acc == pytest.approx(sum(evals[-3:]) / 3)
    assert by[("drpo", 0)].steps_to(0.45, 99) == 5 and by[("drpo", 0)].steps_to(0.9, 99) == 99
    (out / "NOTES.md").write_text("Block x was left out: over budget.\n")
    path = report.write_report(out, tmp_path / "rep", "drpo compare --out X --report-only")
    text = path.read_text()
    for needle in ("collapsed", "Made by `drpo compare --out X --report-only`", "| mu<0.01 |", "not ended",
                   "steps to target", "Block x was left out: over budget.", "EOS_STEPS"):
        assert needle in text, needle
    n_quick = len(g.runs_by_block[g.blocks[0].name])
    assert f"(3 of {n_quick} runs ended;" in text  # drpo seeds 0 and 1, and the diverged dapo run
    assert (tmp_path / "rep" / "curves_fp8.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "ratio_vs_shift.png").exists()


def test_the_report_leads_with_the_map_then_the_verdicts_per_regime(tmp_path):
    out, m = synthetic_decide(tmp_path, drpo_final=0.4, others_final=0.4, collapse=("pg_is",))
    text = report.write_report(out, tmp_path / "rep", "CMD", map_dir=m).read_text()
    order = [text.index(h) for h in ("## The stability map", "### Stage 2's cells", "## Verdicts, per regime",
                                     "### calm", "### stressed", "## Definitions")]
    assert order == sorted(order)
    assert "cell A (mildest) = lr1e-3_s0_fp8" in text and "p(fewer)" in text
    assert (tmp_path / "rep" / "stability_map.png").stat().st_size > 5000
    lrs, rows = report.map_layout(json.loads((m / "grid.json").read_text())["settings"])
    assert lrs == list(LR_LADDER) and rows == [(0, "fp8"), (4, "fp8"), (16, "fp8"), (0, "fp4")]
    # the map's table: PG-IS collapsed in both seeds of the chosen cell, and when
    assert f"| lr 0.001, staleness 0 | {len(MAP_SEEDS)}/{len(MAP_SEEDS)} (step 4,4)" in text


# ---------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_quick_runs_the_grid_and_report(tiny_model_dir, tmp_path):
    out = tmp_path / "quick"
    args = ["compare", "--quick", "--out", str(out), "--steps", "2", "--workers", "2", *tiny(tiny_model_dir)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "grid.json").read_text())
    assert [r["state"] for r in manifest["runs"]] == ["finished"] * 8
    rows = run_io.read_metrics(out / "stale1" / "drpo" / "seed0" / "metrics.jsonl")
    assert [r.get("rollout/staleness") for r in rows if r["step"] > 0] == [0, 1]
    assert "grid 'quick'" in res.output and (out / "report" / "README.md").exists()
    res = CliRunner().invoke(app, ["compare", "--quick", "--out", str(out), "--report-only", "--report",
                                   str(tmp_path / "r"), *tiny(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert "## Curves" in (tmp_path / "r" / "README.md").read_text()
    res = CliRunner().invoke(app, ["compare", "--out", str(tmp_path / "empty"), "--report-only"])
    assert res.exit_code == 2 and "run the grid first" in res.output
    res = CliRunner().invoke(app, ["compare", "--estimate", "60", "--seeds", "1"])
    assert res.exit_code == 0 and f"total: {len(build_grid('map', seeds=1).runs)} unique runs" in res.output
    res = CliRunner().invoke(app, ["compare", "--grid", "decide", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "needs the finished stability map" in res.output


def _compare_process(out: Path, model_dir: str, steps: int, workers: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "drpo.cli", "compare", "--quick", "--out", str(out), "--steps",
                             str(steps), "--workers", str(workers), *tiny(model_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True,  # its own process group: a signal here is for it alone
                            # started as a shell starts a background job (CI does): SIGINT ignored on entry
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _wait_for(cond, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_one_ctrl_c_stops_the_grid_and_a_second_compare_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "g"
    first = _compare_process(out, tiny_model_dir, steps=2000)
    try:
        metrics = out / "fp8" / "drpo" / "seed0" / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(run_io.read_metrics(metrics)) >= 3)
        # a second drpo compare on the same folder exits at once, naming the holder, and moves nothing
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "drpo.cli", "compare", "--quick", "--out", str(out),
                                 "--steps", "2000", *tiny(tiny_model_dir)], capture_output=True, text=True, env=env,
                                timeout=120)
        assert second.returncode == 2 and f"is in use by pid {first.pid}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and time.monotonic() - t0 < 60
        assert not list(out.rglob("*.aborted"))
        os.kill(first.pid, signal.SIGINT)  # one Ctrl-C, to the compare process only
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, stderr
    assert "resume with: drpo compare --quick --out" in stderr and "Traceback" not in stderr + stdout
    manifest = json.loads((out / "grid.json").read_text())
    states = {r["slug"]: r["state"] for r in manifest["runs"]}
    assert states["fp8/drpo/seed0"] == "interrupted" and list(states.values()).count("pending") == 7
    for slug, state in states.items():  # grid.json agrees with the runs on disk
        assert run_io.read_status(out / slug).get("state", "pending") == state
    assert run_io.latest_checkpoint(out / "fp8" / "drpo" / "seed0") is not None  # it checkpointed as it stopped




def test_bad_study_input_is_one_line(tmp_path):
    """A map without PG-IS (stage 2 cannot choose its cells), an unknown stress setting, an unknown rollout
    precision: one line, exit 2."""
    from helpers import assert_one_line

    g = expand("nopgis", [Block("b", "", ("drpo",), (cell(1e-3, 0, "fp8"),), (100,))], GRID_BASE)
    m = tmp_path / "m"
    fake_run(m, g, "drpo", cell(1e-3, 0, "fp8"), 100, final=0.5)
    compare.write_manifest(m, g)
    assert_one_line(CliRunner().invoke(app, ["compare", "--grid", "decide", "--map", str(m), "--out",
                                             str(tmp_path / "d")]), 2, "has no PG-IS runs")
    p = tmp_path / "g.yaml"
    p.write_text("blocks:\n  - {name: b, methods: [drpo], settings: [lr5e-4_s3_fp8], seeds: 1}\n")
    assert_one_line(CliRunner().invoke(app, ["compare", "--grid", str(p), "--out", str(tmp_path / "x")]), 2,
                    "unknown method/setting ['lr5e-4_s3_fp8']")
    assert_one_line(CliRunner().invoke(app, ["compare", "--quick", "--out", str(tmp_path / "y"),
                                             "eval.prompts=0"]), 2, "eval.prompts")
    # a key the grid's settings set cannot be a base override: it would be silently ignored
    assert_one_line(CliRunner().invoke(app, ["compare", "--quick", "--out", str(tmp_path / "y"),
                                             "rollout.precision=bf16"]), 2,
                    "override rollout.precision is set by the grid's setting")
    assert not (tmp_path / "y").exists()  # refused before anything ran


def test_a_pipe_in_a_report_cell_is_escaped_not_a_column_break():
    from drpo.experiments.report import _table

    t = _table(["claim", "verdict"], [["removing |A| weighting hurts", "inconclusive"]]).splitlines()
    # a Markdown row splits on unescaped pipes only: 2 columns, as in the header
    assert [len([c for c in re.split(r"(?<!\\)\|", row)[1:-1]]) for row in (t[0], t[2])] == [2, 2], t
