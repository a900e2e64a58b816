"""Comparison grids as data: a run is (method, setting, seed) -> a list of config overrides.

    Method   an objective with its parameters   ("drpo" = DRPO delta 12.5, "dapo" = GRPO clip-higher, ...)
    Setting  the training conditions            ("fp8" rollout, "bf16" rollout, staleness K=8, ...)
    Block    methods x settings x seeds, named after the claim(s) it serves

The full cross product (14 methods x 7 settings x 5 seeds) is far too big for a CPU, so the
default grid is a *sparse* list of blocks. Runs shared by two blocks (DRPO x FP8 serves the main,
ablation and delta blocks) are run once: a run's directory depends on (setting, method, seed) only.

Defaults live in one place, :mod:`drpo.training.config`; a grid adds its ``base`` overrides (steps,
eval size, ``threads=1``, ...) and each run adds its method's and setting's overrides and its seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from drpo.training.config import load_config


@dataclass(frozen=True)
class Method:
    """An objective with fixed parameters. ``family`` groups methods for the claims:
    'ratio' (trust region on pi/mu), 'divergence' (DPPO), 'drpo', or 'none' (unregularised)."""

    label: str
    objective: str
    params: tuple[tuple[str, float], ...] = ()
    family: str = "none"

    def overrides(self) -> list[str]:
        return [f"objective.name={self.objective}"] + [f"objective.params.{k}={v}" for k, v in self.params]


@dataclass(frozen=True)
class Setting:
    """Training conditions as config overrides. ``lr_scale`` multiplies the grid's base learning rate."""

    label: str
    overrides: tuple[str, ...] = ()
    lr_scale: float = 1.0


METHODS: dict[str, Method] = {
    "pg_is": Method("Unregularized (PG-IS)", "pg_is"),
    "dapo": Method("GRPO clip-higher (0.2/0.28)", "dapo", family="ratio"),
    "spo": Method("SPO (eps 12.5)", "spo", (("epsilon", 12.5),), family="ratio"),
    "dppo_tv": Method("DPPO Binary-TV (0.15)", "dppo_tv", family="divergence"),
    "dppo_kl": Method("DPPO Binary-KL (0.05)", "dppo_kl", family="divergence"),
    "drpo": Method("DRPO (delta 12.5)", "drpo", (("delta", 12.5),), family="drpo"),
    "drpo_d0.15": Method("DRPO (delta 0.15)", "drpo", (("delta", 0.15),), family="drpo"),
    "drpo_d0.5": Method("DRPO (delta 0.5)", "drpo", (("delta", 0.5),), family="drpo"),
    "drpo_d2.5": Method("DRPO (delta 2.5)", "drpo", (("delta", 2.5),), family="drpo"),
    "drpo_no_adv": Method("DRPO w/o advantage weighting", "drpo_no_adv", family="drpo"),
    "mask_drpo": Method("mask-DRPO (delta 0.15)", "mask_drpo", family="drpo"),
    "drpo_kl": Method("DRPO + KL penalty", "drpo_kl", family="drpo"),
}

LR_STRESS = 3.0  # the learning-rate stress setting trains at this multiple of the base lr (1e-4 -> 3e-4)

SETTINGS: dict[str, Setting] = {
    "fp8": Setting("FP8 rollout, K=4", ("rollout.precision=fp8", "train.minibatches=4")),
    "bf16": Setting("BF16 rollout, K=4", ("rollout.precision=bf16", "train.minibatches=4")),
    "fp8_e2e": Setting("FP8 rollout + BF16 trainer, K=4",
                       ("rollout.precision=fp8", "train.precision=bf16", "train.minibatches=4")),
    "fp8_k1": Setting("FP8 rollout, K=1", ("rollout.precision=fp8", "train.minibatches=1")),
    "fp8_k8": Setting("FP8 rollout, K=8", ("rollout.precision=fp8", "train.minibatches=8")),
    "fp8_lr_stress": Setting(f"FP8 rollout, K=4, lr x{LR_STRESS:g}",
                             ("rollout.precision=fp8", "train.minibatches=4"), lr_scale=LR_STRESS),
}

MAIN_METHODS = ("pg_is", "dapo", "spo", "dppo_tv", "dppo_kl", "drpo", "drpo_d0.15")


@dataclass(frozen=True)
class Block:
    name: str
    claims: str
    methods: tuple[str, ...]
    settings: tuple[str, ...]
    seeds: int


# The sparse default grid. Block sizes are methods x settings x seeds; seeds and steps are
# parameters of :func:`build_grid`. Blocks list the main setting (fp8) again where they compare
# against it: those runs are the main block's, shared, not extra. The claim letters are those of the report (drpo.experiments.report).
DEFAULT_BLOCKS: tuple[Block, ...] = (
    Block("main", "(a) DRPO reaches the highest accuracy; (c) lower gradient-norm variance; "
          "(e) the ratio-based penalty (SPO) is worse", MAIN_METHODS, ("fp8",), 5),
    Block("precision", "(b) under FP8 rollout DRPO stays stable where ratio-based methods degrade "
          "(FP8 of the main block against BF16; FP8 end to end)",
          ("pg_is", "dapo", "spo", "drpo"), ("fp8", "bf16", "fp8_e2e"), 5),
    Block("staleness", "(b, c) stability and gradient variance when the anchor grows stale (K=1, 4, 8)",
          ("dapo", "drpo"), ("fp8_k1", "fp8", "fp8_k8"), 5),
    Block("lr_stress", "(b) stability under a learning rate 3x the base", ("dapo", "spo", "dppo_tv", "drpo"),
          ("fp8", "fp8_lr_stress"), 5),
    Block("ablation", "(d) removing advantage weighting hurts; mask-only and KL-penalty variants",
          ("drpo", "drpo_no_adv", "mask_drpo", "drpo_kl"), ("fp8",), 5),
    Block("delta", "(f) delta 12.5 and 2.5 behave alike (sweep 0.15, 0.5, 2.5, 12.5)",
          ("drpo_d0.15", "drpo_d0.5", "drpo_d2.5", "drpo"), ("fp8",), 5),
)

# Grid-wide overrides on top of the config defaults: quiet single-threaded workers, no TensorBoard.
# Runs are sized to fit the 2-hour budget on 2 cores (two single-threaded workers): 30 RL steps,
# held-out accuracy every 10 steps on 256 prompts, a checkpoint every 20 steps.
GRID_BASE = ("threads=1", "progress=false", "tensorboard=false", "train.steps=30", "eval.every=10",
             "save_every=20")

QUICK_BLOCKS = (Block("quick", "smoke test: DRPO against GRPO clip-higher under FP8", ("drpo", "dapo"), ("fp8",), 2),)
QUICK_BASE = ("train.steps=12", "eval.every=4", "eval.prompts=64", "save_every=4")


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
    runs_by_block: dict[str, list[Run]] = field(default_factory=dict)

    @property
    def runs(self) -> list[Run]:
        """Unique runs in block order (a run shared by blocks appears once, under its first block)."""
        seen: dict[str, Run] = {}
        for runs in self.runs_by_block.values():
            for r in runs:
                seen.setdefault(r.slug, r)
        return list(seen.values())

    def to_dict(self) -> dict:
        """The manifest's description of the grid: what the report needs to label and group runs."""
        return {
            "name": self.name,
            "base": list(self.base),
            "blocks": [{"name": b.name, "claims": b.claims, "methods": list(b.methods),
                        "settings": list(b.settings), "seeds": b.seeds,
                        "runs": [r.slug for r in self.runs_by_block[b.name]]} for b in self.blocks],
            "methods": {k: {"label": m.label, "family": m.family, "objective": m.objective,
                            "params": dict(m.params)} for k, m in METHODS.items() if self._uses("methods", k)},
            "settings": {k: {"label": s.label, "overrides": list(s.overrides), "lr_scale": s.lr_scale}
                         for k, s in SETTINGS.items() if self._uses("settings", k)},
            "runs": [{"slug": r.slug, "block": r.block, "method": r.method, "setting": r.setting,
                      "seed": r.seed, "overrides": list(r.overrides)} for r in self.runs],
        }

    def _uses(self, kind: str, key: str) -> bool:
        return any(key in getattr(b, kind) for b in self.blocks)


def expand(name: str, blocks: Sequence[Block], base: Sequence[str]) -> Grid:
    """Every (method, setting, seed) of every block -> its full override list (base first)."""
    base = tuple(base)
    base_lr = load_config(None, list(base)).train.lr
    grid = Grid(name, base, tuple(blocks))
    for b in blocks:
        unknown = [m for m in b.methods if m not in METHODS] + [s for s in b.settings if s not in SETTINGS]
        if unknown:
            raise ValueError(f"grid block {b.name!r}: unknown method/setting {unknown}; "
                             f"methods: {list(METHODS)}, settings: {list(SETTINGS)}")
        runs = []
        for setting in b.settings:
            s = SETTINGS[setting]
            lr = [f"train.lr={base_lr * s.lr_scale:g}"] if s.lr_scale != 1.0 else []
            for method in b.methods:
                for seed in range(b.seeds):
                    ov = base + tuple(METHODS[method].overrides()) + s.overrides + tuple(lr) + (f"seed={seed}",)
                    runs.append(Run(b.name, method, setting, seed, ov))
        grid.runs_by_block[b.name] = runs
    return grid


def build_grid(name: str = "default", *, seeds: Optional[int] = None, steps: Optional[int] = None,
               blocks: Optional[Sequence[str]] = None, overrides: Sequence[str] = ()) -> Grid:
    """The named grid ('default', 'quick') or a YAML grid file, resized.

    seeds      seeds per block (default: each block's own, 5 in the default grid, 2 in quick)
    steps      train.steps of every run (default: the config default, 8 in quick)
    blocks     keep only these blocks (by name)
    overrides  extra base overrides for every run, e.g. ``["model=/path", "train.lr=2e-4"]``

    A YAML grid file holds ``base: [overrides]`` and ``blocks: [{name, claims, methods, settings, seeds}]``
    with method and setting names from :data:`METHODS` and :data:`SETTINGS`.
    """
    if name == "default":
        chosen, base = DEFAULT_BLOCKS, GRID_BASE
    elif name == "quick":
        chosen, base = QUICK_BLOCKS, GRID_BASE + QUICK_BASE
    elif name.endswith((".yaml", ".yml")):
        chosen, base = _load_yaml_grid(Path(name))
        name = Path(name).stem
    else:
        raise ValueError(f"unknown grid {name!r}: use 'default', 'quick' or a .yaml grid file")
    if blocks:
        missing = set(blocks) - {b.name for b in chosen}
        if missing:
            raise ValueError(f"no block(s) {sorted(missing)} in grid {name!r}; it has {[b.name for b in chosen]}")
        chosen = tuple(b for b in chosen if b.name in blocks)
    if seeds is not None:
        chosen = tuple(Block(b.name, b.claims, b.methods, b.settings, seeds) for b in chosen)
    extra = ([f"train.steps={steps}"] if steps is not None else []) + list(overrides)
    return expand(name, chosen, tuple(base) + tuple(extra))


def _load_yaml_grid(path: Path) -> tuple[tuple[Block, ...], tuple[str, ...]]:
    if not path.is_file():
        raise ValueError(f"grid file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        blocks = tuple(Block(b["name"], b.get("claims", ""), tuple(b["methods"]), tuple(b["settings"]),
                             int(b.get("seeds", 5))) for b in data["blocks"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"grid file {path}: each block needs name, methods, settings ({e})") from None
    return blocks, GRID_BASE + tuple(data.get("base", []))


def describe(grid: Grid, seconds_per_run: Optional[float] = None, workers: int = 1) -> str:
    """Run counts per block (and new runs, not shared with an earlier block) and, given the measured
    seconds per run, the wall-clock estimate with ``workers`` parallel runs."""
    lines = [f"grid {grid.name!r}: base overrides {' '.join(grid.base)}"]
    seen: set[str] = set()
    for b in grid.blocks:
        runs = grid.runs_by_block[b.name]
        new = [r for r in runs if r.slug not in seen]
        seen.update(r.slug for r in runs)
        lines.append(f"  {b.name:10s} {len(b.methods)} methods x {len(b.settings)} settings x {b.seeds} seeds "
                     f"= {len(runs):3d} runs ({len(new)} new)  -- {b.claims}")
    n = len(grid.runs)
    lines.append(f"  total: {n} unique runs")
    if seconds_per_run is not None:
        hours = n * seconds_per_run / max(workers, 1) / 3600
        lines.append(f"  estimate: {n} x {seconds_per_run:g} s / {workers} worker(s) = {hours:.2f} h")
    return "\n".join(lines)
