"""The sequential plan (drpo.experiments.sequential) on synthetic runs: which comparisons stop at which look
and why, which blocks of seeds it asks for next, and the grid that ``drpo compare --grid sequential`` runs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from drpo.experiments import compare, grids
from drpo.experiments import sequential as Q
from drpo.training import run_io


def write_run(out: Path, method: str, seed: int, final: float, collapse_at: int | None = None,
              steps: int = Q.STEPS) -> None:
    """A run at the plan's cell: held-out accuracy 0.25 at step 0, then ``final`` (+-0.005); a run that
    collapses falls to 0.01 at step ``collapse_at`` and is stopped 20 steps later, as the trainer does."""
    d = out / f"{Q.CELL.name}/{method}/seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{method}{seed}")
    last = min(steps, collapse_at + 20) if collapse_at else steps
    rows = [{"step": 0, "eval/accuracy": 0.25}]
    for s in range(1, last + 1):
        row = {"step": s, "reward/mean": 0.3}
        if s % 10 == 0 or s == last:
            row["eval/accuracy"] = 0.01 if collapse_at and s >= collapse_at else final + rng.uniform(-0.005, 0.005)
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_io.write_status(d, "collapsed" if collapse_at else "finished", step=last)


# the stressed cell as this synthetic world has it: PG-IS and DRPO 12.5 collapse at step 10, the rest never
OUTCOMES = {"pg_is": (0.02, 10), "drpo": (0.02, 10), "dapo": (0.40, None), "dppo_tv": (0.40, None),
            "drpo_d0.15": (0.40, None)}


def run_look(out: Path, look: int, methods=Q.METHODS) -> None:
    for m in methods:
        for seed in Q.seeds_of(look):
            final, at = OUTCOMES[m]
            write_run(out, m, seed, final, at)


def test_the_plan_is_fixed_data():
    assert Q.SEEDS == tuple(range(1000, 1015)) and Q.LOOKS * Q.BLOCK == len(Q.SEEDS)
    assert not set(Q.SEEDS) & (set(grids.MAP_SEEDS) | set(grids.DECIDE_SEEDS) | {0, 1})  # seeds never used before
    assert [c.id for c in Q.claims()] == ["a", "j", "k", "l", "m"] and all(c.regime == "stressed" for c in Q.claims())
    assert {c.id: Q.test_of(c) for c in Q.claims()} == {"a": "paired", "j": "paired", "k": "log-rank",
                                                        "l": "log-rank", "m": "paired"}
    by = {c.id: c for c in Q.claims()}
    assert (by["l"].treatment, by["l"].control, by["m"].treatment, by["m"].control) == (
        ("drpo_d0.15",), ("dppo_tv",), ("drpo_d0.15",), ("dppo_tv",))  # the paper's comparison at one delta
    assert Q.bounds() == pytest.approx([3.710, 2.511, 1.993], abs=2e-3)
    assert all(c.settings == (Q.CELL.name,) for c in Q.claims()) and Q.CELL.name == "lr1e-3_s4_fp8"


def test_each_comparison_stops_when_it_decides_or_for_futility(tmp_path):
    out = tmp_path / "seq"
    assert Q.blocks_to_run(Q.ended_runs(out)) == [(1, Q.METHODS)]
    run_look(out, 1, [m for m in Q.METHODS if m != "dapo"])
    assert Q.blocks_to_run(Q.ended_runs(out)) == [(1, Q.METHODS)]  # look 1 is not complete without dapo
    assert Q.look(Q.ended_runs(out), Q.claims()[0], 1) is None
    run_look(out, 1, ["dapo"])
    looks = Q.analyse(Q.ended_runs(out))
    first = {c: ls[0] for c, ls in looks.items()}
    # (a): DRPO 12.5 38 points below the controls with a tiny spread: contradicted at once
    assert first["a"].decision == "contradicted" and first["a"].hi < 0 and first["a"].n == 5
    # (j) and (m): alike within a margin of 3 points, at once
    assert first["j"].decision == "reproduced" and first["m"].decision == "equivalent"
    # (k): 5 early collapses against none; a log-rank z of about 2.8 does not cross 3.71 at look 1
    assert first["k"].decision == "continue" and 2 < first["k"].statistic < first["k"].bound
    assert first["l"].decision == "continue" and first["l"].statistic == 0  # no collapse on either side
    assert Q.blocks_to_run(Q.ended_runs(out)) == [(1, Q.METHODS), (2, ("pg_is", "dppo_tv", "drpo_d0.15"))]

    run_look(out, 2, ("pg_is", "dppo_tv", "drpo_d0.15"))
    looks = Q.analyse(Q.ended_runs(out))
    assert [x.decision for x in looks["k"]] == ["continue", "reproduced"] and looks["k"][1].n == 10
    # (l) at look 2 (t = 2/3): z = 0, so the cap decides with a chance of about 0.1%: futility
    assert looks["l"][1].decision == "futility" and looks["l"][1].power < Q.FUTILITY_POWER
    assert [len(v) for v in looks.values()] == [1, 1, 2, 2, 1]
    assert Q.blocks_to_run(Q.ended_runs(out)) == [(1, Q.METHODS), (2, ("pg_is", "dppo_tv", "drpo_d0.15"))]


def test_a_comparison_that_never_decides_ends_inconclusive_at_the_cap(tmp_path, monkeypatch):
    out = tmp_path / "seq"
    monkeypatch.setattr(Q, "FUTILITY_POWER", 0.0)  # no futility stop: the comparison runs to the cap
    monkeypatch.setitem(OUTCOMES, "dppo_tv", (0.40, 50))
    monkeypatch.setitem(OUTCOMES, "drpo_d0.15", (0.40, 50))  # both collapse at the same step: no difference
    for k in range(1, Q.LOOKS + 1):
        run_look(out, k)
    looks = Q.analyse(Q.ended_runs(out))
    assert [x.decision for x in looks["l"]] == ["continue", "continue", "inconclusive"] and looks["l"][-1].n == 15


def test_the_sequential_grid_grows_look_by_look(tmp_path):
    out = tmp_path / "seq"
    g = grids.build_grid("sequential", runs_dir=out)
    assert g.kind == "sequential" and [b.name for b in g.blocks] == ["look1"] and len(g.runs) == 25
    assert {r.seed for r in g.runs} == set(range(1000, 1005)) and {r.setting for r in g.runs} == {Q.CELL.name}
    assert all("train.steps=100" in r.overrides and "train.stop_on_collapse=true" in r.overrides for r in g.runs)
    run_look(out, 1)
    g = grids.build_grid("sequential", runs_dir=out)
    assert [b.name for b in g.blocks] == ["look1", "look2"] and g.blocks[1].seeds == tuple(range(1005, 1010))
    assert g.blocks[1].methods == ("pg_is", "dppo_tv", "drpo_d0.15") and len(g.runs) == 25 + 15
    with pytest.raises(ValueError, match="fixed in advance"):
        grids.build_grid("sequential", seeds=2)


def test_drpo_compare_runs_the_plan_until_it_asks_for_nothing_new(tmp_path, monkeypatch):
    """run_compare runs look after look (each look's runs written here by a stand-in for run_grid)."""
    looks_run = []

    def fake_run_grid(g, out, workers, backend, address):
        new = [b for b in g.blocks if int(b.name[4:]) not in looks_run]
        for b in new:
            looks_run.append(int(b.name[4:]))
            run_look(out, int(b.name[4:]), b.methods)
        return compare.write_manifest(out, g)

    monkeypatch.setattr(compare, "run_grid", fake_run_grid)
    res = compare.run_compare("sequential", tmp_path / "seq", report=tmp_path / "rep")
    assert looks_run == [1, 2] and all(e["state"] in ("finished", "collapsed") for e in res["entries"].values())
    manifest = json.loads((tmp_path / "seq" / "grid.json").read_text())
    assert manifest["kind"] == "sequential" and [b["name"] for b in manifest["blocks"]] == ["look1", "look2"]


def test_the_report_shows_the_plan_the_survival_tests_and_the_robust_aggregates(tmp_path):
    from drpo.experiments import report

    out = tmp_path / "seq"
    run_look(out, 1)
    run_look(out, 2, ("pg_is", "dppo_tv", "drpo_d0.15"))
    compare.write_manifest(out, grids.build_grid("sequential", runs_dir=out))
    text = report.write_report(out, tmp_path / "rep", "CMD").read_text()
    heads = [h for h in text.splitlines() if h.startswith("## ")]
    assert heads[:4] == ["## The sequential plan and where each comparison stopped", "## Verdicts, per regime (nominal)",
                         "## Time to collapse", "## Aggregates for few runs: interquartile mean and probability of "
                         "improvement"]
    assert "| (k) stressed |" in text and "| log-rank | 2 | 10 | **reproduced** |" in text
    assert "| paired | 1 | 5 | **contradicted** |" in text and "**futility**" in text
    assert "z = +4.36, p = 1.31e-05 | treatment later |" in text  # the log-rank beside the exact test, for (k)
    assert "| 0/10 vs 10/10 collapsed | 5.41e-06 | **reproduced** |" in text
    assert "| lr1e-3_s4_fp8 | Unregularized (PG-IS) | 10 | 10 | 10 [" in text  # median time to collapse: step 10
    assert "| DRPO (delta 0.15) | 0.399 [" in text  # IQM
    assert (tmp_path / "rep" / "time_to_collapse.png").stat().st_size > 5000


def test_curves_carry_a_stopped_run_forward_and_intervals_stay_in_range(tmp_path):
    from drpo.experiments import report, results

    out = tmp_path / "seq"
    write_run(out, "drpo", 1000, 0.40)                  # finished, 0.40 to step 100
    write_run(out, "drpo", 1001, 0.40, collapse_at=10)  # collapsed at 10 (0.01), stopped at step 30
    runs = Q.ended_runs(out).by[(Q.CELL.name, "drpo")]
    curve = report.carried_curve(runs, "eval/accuracy", horizon=100)
    at = {int(s): m for s, m in zip(curve.steps, curve.mean)}
    # at step 100 the mean is over both runs (the stopped one at its last value), not over the survivor alone
    assert at[100] == pytest.approx((runs[1000].series("eval/accuracy")[-1][1] + 0.01) / 2)
    assert curve.stopped[list(runs).index(1001)] == (30, 0.01) and curve.stopped[list(runs).index(1000)] is None
    # a stopped run alone still reaches the budget, at its collapsed value
    only = report.carried_curve({1001: runs[1001]}, "eval/accuracy", horizon=100)
    assert only.steps[-1] == 100 and only.mean[-1] == pytest.approx(0.01)
    accs = [r.final_acc for r in results.Runs(list(runs.values())).by[(Q.CELL.name, "drpo")].values()]
    e = report.S.bounded_mean_ci(accs + [0.0, 0.0])
    assert 0 <= e.lo <= e.mean <= e.hi <= 1 and report.S.mean_ci(accs + [0.0, 0.0]).lo < 0  # a t-interval leaves [0, 1]
