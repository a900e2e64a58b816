"""drpo.experiments' structure: no import cycle among its modules, one study module at the bottom, cell
names built in one place, stage 2's cells chosen once, the report reads without writing, run states judged
by one ``ended()``, and committed reports that name no folder of the machine they were made on."""
from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest

from drpo.experiments import compare, grids, report, selection
from drpo.experiments.study import LR_EXTENSION, LR_LADDER, PRECISIONS, SETTINGS, STALE_LADDER, Cell, map_cells

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "src" / "drpo" / "experiments"


def module_imports(path: Path, package: str = "drpo.experiments") -> set[str]:
    """The modules of ``package`` that ``path`` imports, function-local (lazy) imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package:
                out |= {a.name for a in node.names}
            elif node.module.startswith(package + "."):
                out.add(node.module[len(package) + 1:].split(".")[0])
        elif isinstance(node, ast.Import):
            out |= {a.name[len(package) + 1:].split(".")[0] for a in node.names if a.name.startswith(package + ".")}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of a directed graph, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from drpo.experiments.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from drpo.experiments import a\n")
    graph = {p.stem: module_imports(p) for p in tmp_path.glob("*.py")}
    assert graph == {"a": {"b"}, "b": {"a"}} and cycles(graph) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_experiments_and_study_at_the_bottom():
    graph = {p.stem: module_imports(p) - {p.stem} for p in EXPERIMENTS.glob("*.py")}
    assert not cycles(graph), cycles(graph)
    assert graph["study"] == set(), "the study module is the bottom of drpo.experiments"
    assert "grids" not in graph["selection"]  # the cycle of issue 28: selection -> grids -> selection


def test_a_cell_name_is_built_in_one_place():
    c = Cell(3e-4, 4, "fp8")
    assert (c.name, c.rank, c.row, c.label) == ("lr3e-4_s4_fp8", 2, (4, "fp8"), "lr 3e-4, staleness 4, FP8 rollout")
    assert SETTINGS[c.name].cell == c and SETTINGS[c.name].overrides == (
        "rollout.precision=fp8", "rollout.staleness=4", "train.lr=0.0003")
    every = map_cells(LR_LADDER + (LR_EXTENSION,))
    assert len({x.name for x in every}) == len(every) == len(LR_LADDER + (LR_EXTENSION,)) * (len(STALE_LADDER) + 1)
    assert {x.precision for x in every} == set(PRECISIONS)
    with pytest.raises(ValueError, match="no map cell"):
        Cell(5e-4, 4, "fp8")
    # no module of drpo.experiments but study formats or parses a cell name
    for path in EXPERIMENTS.glob("*.py"):
        if path.stem != "study":
            assert not re.search(r'f"lr\{|_s\{|split\("_"\)', path.read_text()), path.name


def _fake_map(tmp_path: Path) -> Path:
    from test_compare import fake_map

    return fake_map(tmp_path / "m", {Cell(1e-3, 4, "fp8").name: len(grids.MAP_SEEDS)})


def test_stage_two_cells_are_chosen_once(tmp_path, monkeypatch):
    m = _fake_map(tmp_path)
    calls = []
    real = selection.pg_is_collapses
    monkeypatch.setattr(selection, "pg_is_collapses", lambda d: calls.append(d) or real(d))
    monkeypatch.setattr(compare, "run_grid", lambda g, out, workers, backend, address: {})
    monkeypatch.setattr(report, "write_report", lambda *a, **k: None)
    compare.run_compare("decide", tmp_path / "d", map_dir=m, blocks=["calm"])
    assert len(calls) == 1  # build_grid chose; run_compare wrote that same choice beside the map
    written = json.loads((m / "stage2_cells.json").read_text())
    assert written["stressed"] == [Cell(1e-3, 4, "fp8").name, Cell(3e-3, 4, "fp8").name]


def test_the_map_section_takes_the_stage_two_notes_and_leaves_the_manifest_alone(tmp_path):
    m = _fake_map(tmp_path)
    ctx = report._context(m, tmp_path / "rep", "CMD")
    ctx.report_dir.mkdir()
    before = copy.deepcopy(ctx.manifest)
    text = "\n".join(report.section_map(ctx, ["cell A (mildest) = X"]))
    assert "* cell A (mildest) = X" in text and ctx.manifest == before
    assert "Stage 2's cells" not in "\n".join(report.section_map(ctx, []))


def test_a_report_that_is_not_the_map_is_not_titled_as_one(tmp_path):
    from test_compare import fake_run

    m = _fake_map(tmp_path)
    assert report.write_report(m, tmp_path / "r1", "CMD").read_text().startswith("# The stability map")
    g = grids.expand("cellA", [grids.Block("b", "", ("drpo",), (Cell(1e-3, 4, "fp8").name,), (1,))], grids.GRID_BASE)
    out = tmp_path / "g"
    fake_run(out, g, "drpo", Cell(1e-3, 4, "fp8").name, 1, final=0.4)
    compare.write_manifest(out, g)
    text = report.write_report(out, tmp_path / "r2", "CMD").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[0] == "# Comparison report: grid `cellA`" and not any("stability map" in h.lower() for h in headings)


def test_run_states_are_judged_by_ended(tmp_path, monkeypatch, capsys):
    entries = {"a": {"state": "failed", "cause": "diverged"}, "b": {"state": "failed", "cause": "rollout_worker"},
               "c": {"state": "collapsed"}, "d": {"state": "interrupted"}}
    monkeypatch.setattr(compare, "run_grid", lambda g, out, workers, backend, address: entries)
    monkeypatch.setattr(report, "write_report", lambda *a, **k: None)
    compare.run_compare("quick", tmp_path / "q")
    said = {line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("run ")}
    assert said == {s for s, e in entries.items() if not compare.ended(e)} == {"b", "d"}
    assert "ended" not in {n.name for n in ast.walk(ast.parse((EXPERIMENTS / "compare.py").read_text()))
                           if isinstance(n, ast.FunctionDef)}


def test_the_rebuild_command_names_paths_as_relative_to_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compare.shown(tmp_path / "runs" / "x") == str(Path("runs") / "x") and compare.shown("runs/x") == "runs/x"
    assert compare.shown(Path("/elsewhere/x")) == "/elsewhere/x"


MACHINE_FOLDER = re.compile(r"(?<![\w.~])/(?:work|home|tmp|root|Users|mnt|opt|var)/")


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "compare").rglob("*.md")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_reports_name_no_folder_of_this_machine(path):
    hits = [line for line in path.read_text().splitlines() if MACHINE_FOLDER.search(line)]
    assert not hits, hits[:3]


def test_the_machine_folder_check_can_fail():
    assert MACHINE_FOLDER.search("Rebuild with `drpo compare --out /work/runs/decide`")
    assert not MACHINE_FOLDER.search("--out runs/decide --report docs/compare/two_stage")
