"""Comparison grids as data: a run is (method, setting, seed) -> a list of config overrides.

    Method   an objective with its parameters   ("drpo" = DRPO delta 12.5, "dapo" = GRPO clip-higher, ...)
    Setting  the training conditions            (a stress cell of the map, the MoE, ...)
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
plus the two blocks the previous grid left out: the MoE with routing replay (claim i) and the
learning-rate stress (x3). Its claims are decided per regime (calm / stressed): :mod:`drpo.experiments.claims`.

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

from drpo.training.config import load_config
from drpo.utils.errors import InputError


@dataclass(frozen=True)
class Method:
    """An objective with fixed parameters. ``family`` groups methods: 'ratio' (trust region on pi/mu),
    'divergence' (DPPO), 'drpo', or 'none' (unregularised)."""

    label: str
    objective: str
    params: tuple[tuple[str, object], ...] = ()
    family: str = "none"

    def overrides(self) -> list[str]:
        return [f"objective.name={self.objective}"] + [f"objective.params.{k}={v}" for k, v in self.params]


@dataclass(frozen=True)
class Setting:
    """Training conditions as config overrides. A cell of the stability map also has its coordinates
    (``lr``, ``staleness``, ``precision``) and its stress ``rank`` (the sum of its rung indices)."""

    label: str
    overrides: tuple[str, ...] = ()
    needs_vllm: bool = False
    lr: Optional[float] = None
    staleness: Optional[int] = None
    precision: Optional[str] = None
    rank: Optional[int] = None


METHODS: dict[str, Method] = {
    "pg_is": Method("Unregularized (PG-IS)", "pg_is"),
    "dapo": Method("GRPO clip-higher (0.2/0.28)", "dapo", family="ratio"),
    "spo": Method("SPO (eps 12.5) = DRPO ratio penalty", "spo", (("epsilon", 12.5),), family="ratio"),
    "dppo_tv": Method("DPPO Binary-TV (0.15)", "dppo_tv", family="divergence"),
    "dppo_kl": Method("DPPO Binary-KL (0.05)", "dppo_kl", family="divergence"),
    "drpo": Method("DRPO (delta 12.5)", "drpo", (("delta", 12.5),), family="drpo"),
    "drpo_d0.15": Method("DRPO (delta 0.15)", "drpo", (("delta", 0.15),), family="drpo"),
    "drpo_d0.5": Method("DRPO (delta 0.5)", "drpo", (("delta", 0.5),), family="drpo"),
    "drpo_d2.5": Method("DRPO (delta 2.5)", "drpo", (("delta", 2.5),), family="drpo"),
    "drpo_auto": Method("DRPO (adaptive delta)", "drpo", (("delta", "auto"),), family="drpo"),
    "drpo_no_adv": Method("DRPO w/o advantage weighting", "drpo_no_adv", family="drpo"),
    "mask_drpo": Method("mask-DRPO (delta 0.15)", "mask_drpo", family="drpo"),
    "drpo_kl": Method("DRPO + KL penalty", "drpo_kl", family="drpo"),
}

# ---------------------------------------------------------------------------- the stability map's cells
LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3)  # 1e-4 is the default run's
STALE_LADDER = (0, 4, 16)
PRECISIONS = ("fp8", "fp4")           # fp8: the default rollout; fp4: NVFP4 weights (drpo.rollout.precision)
LR_EXTENSION = 1e-2                   # the rung added by --grid map-ext if no cell collapses PG-IS in every seed


def fmt_lr(lr: float) -> str:
    """1e-4 -> '1e-4', 3e-4 -> '3e-4' (for names and labels)."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def cell(lr: float, staleness: int, precision: str) -> str:
    """The setting name of a map cell, e.g. 'lr3e-4_s4_fp8'."""
    return f"lr{fmt_lr(lr)}_s{staleness}_{precision}"


def _map_cells(lrs: Sequence[float]) -> dict[str, Setting]:
    """learning rate x staleness at FP8, and the 4-bit rollout along the learning rate (staleness 0)."""
    out = {}
    for i, lr in enumerate(lrs):
        for j, n in enumerate(STALE_LADDER):
            out[cell(lr, n, "fp8")] = Setting(f"lr {fmt_lr(lr)}, staleness {n}, FP8 rollout",
                                              ("rollout.precision=fp8", f"rollout.staleness={n}", f"train.lr={lr:g}"),
                                              lr=lr, staleness=n, precision="fp8", rank=i + j)
        out[cell(lr, 0, "fp4")] = Setting(f"lr {fmt_lr(lr)}, staleness 0, FP4 rollout",
                                          ("rollout.precision=fp4", "rollout.staleness=0", f"train.lr={lr:g}"),
                                          lr=lr, staleness=0, precision="fp4", rank=i + 1)
    return out


CALM = cell(1e-4, 0, "fp8")  # the default run's conditions
LR_STRESS = cell(3e-4, 0, "fp8")  # the previous grid's learning-rate stress (x3), left out there

SETTINGS: dict[str, Setting] = {
    **_map_cells(LR_LADDER + (LR_EXTENSION,)),
    "moe_fp8": Setting("MoE, FP8 rollout, no routing replay", ("model=builtin-moe", "rollout.precision=fp8")),
    "moe_fp8_replay": Setting("MoE, FP8 rollout, routing replay",
                              ("model=builtin-moe", "rollout.precision=fp8", "train.routing_replay=true")),
    "fp8": Setting("FP8 rollout (HF engine), synchronous", ("rollout.precision=fp8",)),
    "stale1": Setting("FP8 rollout, staleness 1", ("rollout.precision=fp8", "rollout.staleness=1")),
    "vllm_bf16": Setting("vLLM BF16 rollout, synchronous", ("rollout.engine=vllm", "rollout.precision=bf16"),
                         needs_vllm=True),
}

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
GRID_BASE = ("threads=1", "progress=false", "tensorboard=false", "eval.every=10", "save_every=50",
             "train.overlong_reward=0", "train.stop_on_collapse=true")
QUICK_BLOCKS = (Block("quick", "smoke test: DRPO against GRPO clip-higher, synchronous and staleness 1",
                      ("drpo", "dapo"), ("fp8", "stale1"), (0, 1)),)
QUICK_BASE = ("train.steps=12", "eval.every=4", "eval.prompts=64", "save_every=4")


def map_blocks(extended: bool = False) -> tuple[Block, ...]:
    """Stage 1: one block per stress axis (the cells of the learning-rate x staleness ladder at FP8, and the
    FP4 row); ``extended`` adds the :data:`LR_EXTENSION` rung to both."""
    lrs = LR_LADDER + ((LR_EXTENSION,) if extended else ())
    fp8 = tuple(cell(lr, n, "fp8") for lr in lrs for n in STALE_LADDER)
    fp4 = tuple(cell(lr, 0, "fp4") for lr in lrs)
    return (Block("map_fp8", "stability map: learning rate x staleness, FP8 rollout", MAP_METHODS, fp8, MAP_SEEDS),
            Block("map_fp4", "stability map: learning rate, 4-bit (NVFP4) rollout", MAP_METHODS, fp4, MAP_SEEDS))


def decide_blocks(stressed: Sequence[str]) -> tuple[Block, ...]:
    """Stage 2 at the chosen ``stressed`` cells and the calm one, then the MoE replay and lr-stress blocks."""
    return (Block("calm", "(a)-(h), (j) in the calm regime (the default run's conditions)", DECIDE_METHODS,
                  (CALM,), DECIDE_SEEDS),
            Block("stressed", "(a)-(h), (j) in the stressed regime (cells chosen from stage 1 by PG-IS alone)",
                  DECIDE_METHODS, tuple(stressed), DECIDE_SEEDS),
            Block("replay", "(i) MoE: DRPO without routing replay vs GRPO clip-higher with it",
                  ("drpo",), ("moe_fp8",), DECIDE_SEEDS),
            Block("replay_control", "(i) the control: GRPO clip-higher with routing replay",
                  ("dapo",), ("moe_fp8_replay",), DECIDE_SEEDS),
            Block("lr_stress", "learning rate x3 (the block the previous grid left out)",
                  ("dapo", "spo", "dppo_tv", "drpo", "drpo_d0.15", "drpo_auto"), (LR_STRESS,), DECIDE_SEEDS))


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


@dataclass
class Grid:
    name: str
    base: tuple[str, ...]
    blocks: tuple[Block, ...]
    claims: tuple = ()  # drpo.experiments.claims.Claim
    runs_by_block: dict[str, list[Run]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # how the grid was chosen (stage 2: the rule's choice and why)

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
            "base": list(self.base),
            "notes": list(self.notes),
            "blocks": [{"name": b.name, "claims": b.claims, "methods": list(b.methods),
                        "settings": list(b.settings), "seeds": list(b.seeds),
                        "runs": [r.slug for r in self.runs_by_block[b.name]]} for b in self.blocks],
            "claims": [c.to_dict() for c in self.claims],
            "methods": {k: {"label": m.label, "family": m.family, "objective": m.objective,
                            "params": dict(m.params)} for k, m in METHODS.items() if self._uses("methods", k)},
            "settings": {k: {"label": s.label, "overrides": list(s.overrides), "lr": s.lr, "staleness": s.staleness,
                             "precision": s.precision, "rank": s.rank}
                         for k, s in SETTINGS.items() if self._uses("settings", k)},
            "runs": [{"slug": r.slug, "block": r.block, "method": r.method, "setting": r.setting,
                      "seed": r.seed, "overrides": list(r.overrides)} for r in self.runs],
        }

    def _uses(self, kind: str, key: str) -> bool:
        return any(key in getattr(b, kind) for b in self.blocks)


def expand(name: str, blocks: Sequence[Block], base: Sequence[str], claims: Sequence = (),
           notes: Sequence[str] = ()) -> Grid:
    """Every (method, setting, seed) of every block -> its full override list (base first)."""
    grid = Grid(name, tuple(base), tuple(blocks), tuple(claims), notes=tuple(notes))
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


GRIDS = ("map", "map-ext", "decide", "quick")


def build_grid(name: str = "map", *, seeds: Optional[int] = None, steps: Optional[int] = None,
               blocks: Optional[Sequence[str]] = None, overrides: Sequence[str] = (),
               map_dir: Optional[Path] = None) -> Grid:
    """A named grid (:data:`GRIDS`) or a YAML grid file, resized.

    seeds      seeds per block: the first ``seeds`` of each block's own
    steps      train.steps of every run (default: the grid's)
    blocks     keep only these blocks (by name)
    overrides  extra base overrides for every run, e.g. ``["model=/path", "train.lr=2e-4"]``
    map_dir    ``decide`` only: the folder of the finished stage-1 map, whose PG-IS runs choose the cells

    A YAML grid file holds ``base: [overrides]``, ``blocks: [{name, claims, methods, settings, seeds}]``
    with method and setting names from :data:`METHODS` and :data:`SETTINGS` (``seeds``: a count, or a
    list of seeds), and optionally ``claims:``, a list of built-in claim ids and/or claim definitions
    (:mod:`drpo.experiments.claims`).
    """
    from drpo.experiments import claims as C

    notes: tuple[str, ...] = ()
    if name in ("map", "map-ext"):
        chosen, base, claims = map_blocks(extended=name == "map-ext"), GRID_BASE + (f"train.steps={MAP_STEPS}",), ()
    elif name == "decide":
        if map_dir is None:
            raise InputError("--grid decide needs the finished stability map: --map DIR (the --out of --grid map)")
        from drpo.experiments.selection import choose_cells

        choice = choose_cells(Path(map_dir))
        chosen = decide_blocks(choice.stressed)
        base, claims, notes = GRID_BASE + (f"train.steps={DECIDE_STEPS}",), C.decide_claims(CALM, choice.stressed), choice.notes
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
    grid = expand(name, chosen, tuple(base) + tuple(extra), claims, notes)
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
