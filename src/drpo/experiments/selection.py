"""Stage 2's cells, chosen from the stability map by a rule written before the map ran, on PG-IS's
(the unregularised baseline's) runs alone -- never on the other methods' results:

1. A cell is a *positive control* when every PG-IS seed of stage 1 collapsed there
   (:mod:`drpo.training.collapse`: collapsed at some step; a diverged run counts).
2. Cell A: the positive control with the lowest stress rank (the sum of its rung indices: learning
   rate, staleness, and 1 for the 4-bit rollout); ties: the lower learning rate, then the lower
   staleness, then FP8 before FP4.
3. Cell B: one rung harder than A along the learning rate (same staleness and precision); if A is on
   the map's top learning-rate rung, one rung harder along the staleness; none if neither is in the map.
4. No positive control: the map is extended by one learning-rate rung (``--grid map-ext``, the same
   folder); if there is still none, A and B are the two cells where PG-IS collapsed most often (ties:
   the higher stress rank), and the report says that no cell collapses PG-IS in every seed.

Every PG-IS run of the map must have ended before the rule is applied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from drpo.experiments.study import LR_EXTENSION, LR_LADDER, SETTINGS, STALE_LADDER, Cell
from drpo.experiments.results import load_runs
from drpo.utils.errors import InputError


@dataclass(frozen=True)
class Choice:
    stressed: tuple[str, ...]     # cell A, then cell B when there is one
    positive_control: bool        # A collapses PG-IS in every seed
    notes: tuple[str, ...]        # what the rule saw and chose, for the grid's manifest and the report


def pg_is_collapses(map_dir: Path) -> dict[str, tuple[int, int]]:
    """Per map cell: (PG-IS runs that collapsed, PG-IS runs), from the map's ended runs."""
    manifest, done, pending = load_runs(map_dir)
    waiting = [s for s in pending if "/pg_is/" in s]
    if waiting:
        raise InputError(f"the stability map in {map_dir} has PG-IS runs that have not ended ({waiting[:3]}...); "
                         "finish it (run its drpo compare again) before choosing stage 2's cells")
    counts: dict[str, tuple[int, int]] = {}
    for r in done:
        if r.method == "pg_is":
            k, n = counts.get(r.setting, (0, 0))
            counts[r.setting] = (k + r.collapsed, n + 1)
    if not counts:
        raise InputError(f"the grid in {map_dir} has no PG-IS runs: the stage-2 rule needs them (is it a --grid map folder?)")
    return counts


def _cell(name: str) -> Cell:
    cell = SETTINGS[name].cell
    if cell is None:
        raise ValueError(f"setting {name!r} is not a cell of the stability map")
    return cell


def _order(name: str) -> tuple:
    c = _cell(name)
    return (c.rank, c.lr, c.staleness, c.precision != "fp8")


def harder(a: str, in_map: set[str]) -> str | None:
    """Cell B of the rule: one learning-rate rung up from ``a``, else one staleness rung up."""
    c = _cell(a)
    lrs = LR_LADDER + (LR_EXTENSION,)
    i = lrs.index(c.lr)
    if i + 1 < len(lrs) and Cell(lrs[i + 1], c.staleness, c.precision).name in in_map:
        return Cell(lrs[i + 1], c.staleness, c.precision).name
    j = STALE_LADDER.index(c.staleness)
    if j + 1 < len(STALE_LADDER) and Cell(c.lr, STALE_LADDER[j + 1], c.precision).name in in_map:
        return Cell(c.lr, STALE_LADDER[j + 1], c.precision).name
    return None


def choose_cells(map_dir: Path) -> Choice:
    """Apply the rule of the module docstring to the map in ``map_dir``."""
    counts = pg_is_collapses(Path(map_dir))
    in_map = set(counts)
    seen = "; ".join(f"{c} {k}/{n}" for c, (k, n) in sorted(counts.items(), key=lambda kv: _order(kv[0])))
    controls = sorted((c for c, (k, n) in counts.items() if n and k == n), key=_order)
    notes = [f"PG-IS collapses per map cell (collapsed/runs): {seen}"]
    if controls:
        a = controls[0]
        b = harder(a, in_map)
        notes.append(f"positive control: PG-IS collapsed in every seed in {len(controls)} cell(s): {', '.join(controls)}; "
                     f"cell A (mildest) = {a}, cell B (one rung harder) = {b or 'none in the map'}")
        return Choice((a,) + ((b,) if b else ()), True, tuple(notes))
    extended = any(_cell(c).lr == LR_EXTENSION for c in in_map)
    if not extended:
        raise InputError(f"no cell of the map in {map_dir} collapses PG-IS in every seed; the rule extends the map "
                         f"first: drpo compare --grid map-ext --out {map_dir} (adds learning rate {LR_EXTENSION:g})")
    most = sorted(counts, key=lambda c: (-counts[c][0], -_cell(c).rank))[:2]
    notes.append("NO POSITIVE CONTROL: no cell of the (extended) map collapses PG-IS in every seed; "
                 f"stage 2 runs at the two cells where PG-IS collapsed most often: {', '.join(most)}")
    return Choice(tuple(most), False, tuple(notes))


def write_choice(map_dir: Path, choice: Choice) -> Path:
    """Keep the choice next to the map (``stage2_cells.json``), for the record."""
    path = Path(map_dir) / "stage2_cells.json"
    path.write_text(json.dumps({"stressed": list(choice.stressed), "positive_control": choice.positive_control,
                                "notes": list(choice.notes)}, indent=1))
    return path
