"""Comparison grids as data: a run is (method, setting, seed) -> a list of config overrides.

    Method   an objective with its parameters   (:mod:`drpo.experiments.study`)
    Setting  the training conditions            (a cell of the stability map, the MoE, ...; the same module)
    Block    methods x settings x seeds, named after the claim(s) it serves

The study is two grids, run in order (``make compare``; the rules were written before either ran):

**Stage 1, the stability map** (``--grid map``): a coarse ladder over two stress axes at the FP8 rollout,
learning rate :data:`LR_LADDER` x staleness :data:`STALE_LADDER`, plus the 4-bit (NVFP4) rollout along
the learning rate, with :data:`MAP_METHODS` (PG-IS, GRPO clip-higher, DPPO Binary-TV, DRPO at delta 12.5
and 0.15), :data:`MAP_SEEDS` seeds per cell, :data:`MAP_STEPS` steps each. It draws where each method
collapses (:mod:`drpo.training.collapse`).

**Stage 2, where it matters** (``--grid decide --map DIR``): the cells :func:`choose_cells` picks from
stage 1 -- by a rule on PG-IS's results alone, never the other methods' -- and the calm cell for contrast,
with :data:`DECIDE_METHODS`, :data:`DECIDE_SEEDS` new seeds (not stage 1's), :data:`DECIDE_STEPS` steps;
plus the MoE with routing replay (claim i). Its claims are decided per regime (calm / stressed):
:mod:`drpo.experiments.claims`. (The learning-rate stress block (lr x3, 30 runs) that an earlier grid left
out is not part of it: cut on budget before any stage-2 result, it was never run; the map holds that cell,
lr 3e-4 at staleness 0, with five methods x two seeds.)

Every run of both stages: one thread, no TensorBoard, held-out accuracy every 10 steps on the default
256 prompts, a response cut at ``rollout.max_new_tokens`` without EOS earns reward 0
(``train.overlong_reward=0``: a degenerate response must not keep its reward, see the README), and a run
that collapsed beyond recovery stops there (``train.stop_on_collapse=true``; recorded as collapsed).

Runs shared by two blocks are run once: a run's directory depends on (setting, method, seed) only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from drpo.experiments import claims as C
from drpo.experiments import sequential as Q
from drpo.experiments.selection import Choice, choose_cells
from drpo.experiments.study import CALM, LR_EXTENSION, LR_LADDER, METHODS, SETTINGS, map_cells
from drpo.training.config import load_config
from drpo.utils.errors import InputError


MAP_METHODS = ("pg_is", "dapo", "dppo_tv", "drpo", "drpo_d0.15")
MAP_SEEDS = (100, 101)
MAP_STEPS = 100
DECIDE_METHODS = ("pg_is", "dapo", "spo", "dppo_tv", "drpo", "drpo_d0.15", "drpo_auto", "drpo_no_adv")
DECIDE_SEEDS = (200, 201, 202, 203, 204)
DECIDE_STEPS = 100  # as the map's: 2 x 130 runs must fit the 6-hour budget with stage 1 (fixed before either ran)


@dataclass(frozen=True)
class Block:
    name: str
    claims: str
    methods: tuple[str, ...]
    settings: tuple[str, ...]
    seeds: tuple[int, ...]


# Grid-wide overrides on top of the config defaults (see the module docstring).
# train.share_prompts and train.fused_optimizer false: the trainer as the committed study ran it (both came
# later: the same maths, float-level differences), so that every grid reproduces its runs number for number.
GRID_BASE = ("threads=1", "progress=false", "tensorboard=false", "eval.every=10", "save_every=50",
             "train.overlong_reward=0", "train.stop_on_collapse=true",
             "train.share_prompts=false", "train.fused_optimizer=false")
QUICK_BLOCKS = (Block("quick", "smoke test: DRPO against GRPO clip-higher, synchronous and staleness 1",
                      ("drpo", "dapo"), ("fp8", "stale1"), (0, 1)),)
QUICK_BASE = ("train.steps=12", "eval.every=4", "eval.prompts=64", "save_every=4")


def map_blocks(extended: bool = False) -> tuple[Block, ...]:
    """Stage 1: one block per stress axis (the cells of the learning-rate x staleness ladder at FP8, and the
    FP4 row); ``extended`` adds the :data:`LR_EXTENSION` rung to both."""
    lrs = LR_LADDER + ((LR_EXTENSION,) if extended else ())
    fp8 = tuple(c.name for c in map_cells(lrs) if c.precision == "fp8")
    fp4 = tuple(c.name for c in map_cells(lrs) if c.precision == "fp4")
    return (Block("map_fp8", "stability map: learning rate x staleness, FP8 rollout", MAP_METHODS, fp8, MAP_SEEDS),
            Block("map_fp4", "stability map: learning rate, 4-bit (NVFP4) rollout", MAP_METHODS, fp4, MAP_SEEDS))


def decide_blocks(stressed: Sequence[str]) -> tuple[Block, ...]:
    """Stage 2 at the chosen ``stressed`` cells and the calm one, then the MoE replay blocks."""
    return (Block("calm", "(a)-(h), (j) in the calm regime (the default run's conditions)", DECIDE_METHODS,
                  (CALM,), DECIDE_SEEDS),
            Block("stressed", "(a)-(h), (j) in the stressed regime (cells chosen from stage 1 by PG-IS alone)",
                  DECIDE_METHODS, tuple(stressed), DECIDE_SEEDS),
            Block("replay", "(i) MoE: DRPO without routing replay vs GRPO clip-higher with it",
                  ("drpo",), ("moe_fp8",), DECIDE_SEEDS),
            Block("replay_control", "(i) the control: GRPO clip-higher with routing replay",
                  ("dapo",), ("moe_fp8_replay",), DECIDE_SEEDS))


@dataclass(frozen=True)
class Run:
    block: str
    method: str
    setting: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        """The run's directory below the grid's folder; shared by every block holding the run."""
        return f"{self.setting}/{self.method}/seed{self.seed}"


KINDS = ("map", "decide", "sequential", "quick", "file")


@dataclass
class Grid:
    """A grid's runs by block. ``kind``: 'map' (the stability map, stage 1), 'decide' (stage 2),
    'sequential' (seeds added at cell A by :mod:`drpo.experiments.sequential`), 'quick', or 'file' (a YAML
    grid file); ``choice``: stage 2's cells as the rule chose them (made once, in
    :func:`build_grid`, and written beside the map by ``drpo compare``)."""

    name: str
    base: tuple[str, ...]
    blocks: tuple[Block, ...]
    claims: tuple[C.Claim, ...] = ()
    runs_by_block: dict[str, list[Run]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # how the grid was chosen (stage 2: the rule's choice and why)
    kind: str = "file"
    choice: Optional[Choice] = None

    @property
    def runs(self) -> list[Run]:
        """Unique runs in block order (a run shared by blocks appears once, under its first block)."""
        seen: dict[str, Run] = {}
        for runs in self.runs_by_block.values():
            for r in runs:
                seen.setdefault(r.slug, r)
        return list(seen.values())

    @property
    def needs_vllm(self) -> bool:
        return any(SETTINGS[s].needs_vllm for b in self.blocks for s in b.settings)

    def to_dict(self) -> dict:
        """The manifest's description of the grid: what the report needs to label and group runs."""
        return {
            "name": self.name,
            "kind": self.kind,
            "base": list(self.base),
            "notes": list(self.notes),
            "blocks": [{"name": b.name, "claims": b.claims, "methods": list(b.methods),
                        "settings": list(b.settings), "seeds": list(b.seeds),
                        "runs": [r.slug for r in self.runs_by_block[b.name]]} for b in self.blocks],
            "claims": [c.to_dict() for c in self.claims],
            "methods": {k: {"label": m.label, "family": m.family, "objective": m.objective,
                            "params": dict(m.params)} for k, m in METHODS.items() if self._uses("methods", k)},
            "settings": {k: {"label": s.label, "overrides": list(s.overrides),
                             **({"lr": s.cell.lr, "staleness": s.cell.staleness, "precision": s.cell.precision,
                                 "rank": s.cell.rank} if s.cell else {})}
                         for k, s in SETTINGS.items() if self._uses("settings", k)},
            "runs": [{"slug": r.slug, "block": r.block, "method": r.method, "setting": r.setting,
                      "seed": r.seed, "overrides": list(r.overrides)} for r in self.runs],
        }

    def _uses(self, kind: str, key: str) -> bool:
        return any(key in getattr(b, kind) for b in self.blocks)


def expand(name: str, blocks: Sequence[Block], base: Sequence[str], claims: Sequence[C.Claim] = (),
           notes: Sequence[str] = (), kind: str = "file", choice: Optional[Choice] = None) -> Grid:
    """Every (method, setting, seed) of every block -> its full override list (base first)."""
    if kind not in KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; known: {KINDS}")
    grid = Grid(name, tuple(base), tuple(blocks), tuple(claims), notes=tuple(notes), kind=kind, choice=choice)
    for b in blocks:
        unknown = [m for m in b.methods if m not in METHODS] + [s for s in b.settings if s not in SETTINGS]
        if unknown:
            raise InputError(f"grid block {b.name!r}: unknown method/setting {unknown}; "
                             f"methods: {list(METHODS)}, settings: {list(SETTINGS)}")
        grid.runs_by_block[b.name] = [
            Run(b.name, m, s, seed, tuple(base) + tuple(METHODS[m].overrides()) + SETTINGS[s].overrides
                + (f"seed={seed}",))
            for s in b.settings for m in b.methods for seed in b.seeds]
    return grid


GRIDS = ("map", "map-ext", "decide", "sequential", "quick")


def build_grid(name: str = "map", *, seeds: Optional[int] = None, steps: Optional[int] = None,
               blocks: Optional[Sequence[str]] = None, overrides: Sequence[str] = (),
               map_dir: Optional[Path] = None, runs_dir: Optional[Path] = None) -> Grid:
    """A named grid (:data:`GRIDS`) or a YAML grid file, resized.

    seeds      seeds per block: the first ``seeds`` of each block's own
    steps      train.steps of every run (default: the grid's)
    blocks     keep only these blocks (by name)
    overrides  extra base overrides for every run, e.g. ``["model=/path", "train.lr=2e-4"]``
    map_dir    ``decide`` only: the folder of the finished stage-1 map, whose PG-IS runs choose the cells
    runs_dir   ``sequential`` only: the grid's own folder, whose ended runs decide which blocks of seeds the
               plan asks for next (none yet: the first block)

    A YAML grid file holds ``base: [overrides]``, ``blocks: [{name, claims, methods, settings, seeds}]``
    with method and setting names from :data:`METHODS` and :data:`SETTINGS` (``seeds``: a count, or a
    list of seeds), and optionally ``claims:``, a list of built-in claim ids and/or claim definitions
    (:mod:`drpo.experiments.claims`).
    """
    notes: tuple[str, ...] = ()
    choice: Optional[Choice] = None
    kind = "map" if name in ("map", "map-ext") else name if name in KINDS else "file"
    if name in ("map", "map-ext"):
        chosen, base, claims = map_blocks(extended=name == "map-ext"), GRID_BASE + (f"train.steps={MAP_STEPS}",), ()
    elif name == "decide":
        if map_dir is None:
            raise InputError("--grid decide needs the finished stability map: --map DIR (the --out of --grid map)")
        choice = choose_cells(Path(map_dir))
        chosen = decide_blocks(choice.stressed)
        base, claims, notes = GRID_BASE + (f"train.steps={DECIDE_STEPS}",), C.decide_claims(CALM, choice.stressed), choice.notes
    elif name == "sequential":
        if seeds is not None or blocks:
            raise InputError("--grid sequential is a plan fixed in advance: its seeds and blocks cannot be chosen")
        chosen = tuple(Block(f"look{k}", f"look {k} of the sequential plan: seeds for the comparisons still open",
                             methods, (Q.CELL.name,), Q.seeds_of(k)) for k, methods in Q.blocks_to_run(Q.ended_runs(runs_dir)))
        base, claims = GRID_BASE + (f"train.steps={Q.STEPS}",), Q.claims()
    elif name == "quick":
        chosen, base, claims = QUICK_BLOCKS, GRID_BASE + QUICK_BASE, ()
    elif name.endswith((".yaml", ".yml")):
        chosen, base, raw_claims = _load_yaml_grid(Path(name))
        claims = C.parse_claims(raw_claims, where=f"grid file {name}")
        name = Path(name).stem
    else:
        raise InputError(f"unknown grid {name!r}: use one of {', '.join(GRIDS)}, or a .yaml grid file")
    if map_dir is not None and name != "decide":
        raise InputError("--map is for --grid decide only")
    if blocks:
        missing = set(blocks) - {b.name for b in chosen}
        if missing:
            raise InputError(f"no block(s) {sorted(missing)} in grid {name!r}; it has {[b.name for b in chosen]}")
        chosen = tuple(b for b in chosen if b.name in blocks)
    if seeds is not None:
        chosen = tuple(Block(b.name, b.claims, b.methods, b.settings, b.seeds[:seeds]) for b in chosen)
    extra = ([f"train.steps={steps}"] if steps is not None else []) + list(overrides)
    grid = expand(name, chosen, tuple(base) + tuple(extra), claims, notes, kind=kind, choice=choice)
    _check_overrides(overrides, chosen)
    load_config(None, list(grid.base))  # bad overrides fail here, before any run
    if grid.runs:
        load_config(None, list(grid.runs[0].overrides))
    return grid


def _check_overrides(overrides: Sequence[str], blocks: Sequence[Block]) -> None:
    """A user's base override may not set a key the grid's methods or settings set: the run's own value
    would silently win, and the grid would not be what the user asked for."""
    key = lambda item: item.split("=", 1)[0].strip()  # noqa: E731
    owned = {key(o): f"setting {s!r}" for b in blocks for s in b.settings for o in SETTINGS[s].overrides}
    owned.update({key(o): f"method {m!r}" for b in blocks for m in b.methods for o in METHODS[m].overrides()})
    taken = [(key(o), owned[key(o)]) for o in overrides if key(o) in owned]
    if taken:
        raise InputError(f"override {taken[0][0]} is set by the grid's {taken[0][1]} (and would be ignored); choose "
                         "another grid or setting, or a YAML grid file with your own settings")


def _load_yaml_grid(path: Path) -> tuple[tuple[Block, ...], tuple[str, ...], list]:
    if not path.is_file():
        raise InputError(f"grid file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"grid file {path} is not valid UTF-8 YAML: {str(e).splitlines()[0]}") from None
    try:
        blocks = []
        for b in data["blocks"]:
            seeds = b.get("seeds", 5)
            blocks.append(Block(b["name"], b.get("claims", ""), tuple(b["methods"]), tuple(b["settings"]),
                                tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"grid file {path}: each block needs name, methods, settings ({e})") from None
    return tuple(blocks), GRID_BASE + tuple(data.get("base", [])), list(data.get("claims", []))


def describe(grid: Grid, seconds_per_run: Optional[float] = None, workers: int = 1) -> str:
    """Run counts per block (and new runs, not shared with an earlier block) and, given the measured
    seconds per run, the wall-clock estimate with ``workers`` parallel runs."""
    lines = [f"grid {grid.name!r}: base overrides {' '.join(grid.base)}"] + [f"  note: {n}" for n in grid.notes]
    seen: set[str] = set()
    for b in grid.blocks:
        runs = grid.runs_by_block[b.name]
        new = [r for r in runs if r.slug not in seen]
        seen.update(r.slug for r in runs)
        lines.append(f"  {b.name:14s} {len(b.methods)} methods x {len(b.settings)} settings x {len(b.seeds)} seeds "
                     f"= {len(runs):3d} runs ({len(new)} new)  -- {b.claims}")
    n = len(grid.runs)
    lines.append(f"  total: {n} unique runs; claims: {', '.join(c.id for c in grid.claims) or 'none'}")
    if seconds_per_run is not None:
        hours = n * seconds_per_run / max(workers, 1) / 3600
        lines.append(f"  estimate: {n} x {seconds_per_run:g} s / {workers} worker(s) = {hours:.2f} h")
    return "\n".join(lines)
