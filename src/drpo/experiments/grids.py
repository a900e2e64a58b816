"""Comparison grids as data: a run is (method, setting, seed) -> a list of config overrides.

    Method   an objective with its parameters   ("drpo" = DRPO delta 12.5, "dapo" = GRPO clip-higher, ...)
    Setting  the training conditions            (FP8 rollout, staleness N, vLLM engine, MoE, lr stress, ...)
    Block    methods x settings x seeds, named after the claim(s) it serves

The full cross product is far too big for a CPU, so the default grid is a *sparse* list of blocks
(see :data:`DEFAULT_BLOCKS` and the report's "Grid" section for what was left out and why). Runs
shared by two blocks are run once: a run's directory depends on (setting, method, seed) only.

Defaults live in the run config (:mod:`drpo.training.config`); a grid adds its ``base`` overrides
(steps, evaluation, ``threads=1``, ...), each run its method's and setting's overrides and its seed.
The claims the report decides on are data too (:mod:`drpo.experiments.claims`); a YAML grid file
names the built-in claims it serves or defines its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from drpo.training.config import load_config


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
    """Training conditions as config overrides. ``lr_scale`` multiplies the grid's base learning rate;
    ``needs_vllm``: the runs need the vLLM engine (.venv-vllm)."""

    label: str
    overrides: tuple[str, ...] = ()
    lr_scale: float = 1.0
    needs_vllm: bool = False


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

LR_STRESS = 3.0  # the learning-rate stress setting trains at this multiple of the base lr (1e-4 -> 3e-4)

SETTINGS: dict[str, Setting] = {
    "fp8": Setting("FP8 rollout (HF engine), synchronous", ("rollout.precision=fp8",)),
    "bf16": Setting("BF16 rollout (HF engine), synchronous", ("rollout.precision=bf16",)),
    "stale2": Setting("FP8 rollout, staleness 2", ("rollout.precision=fp8", "rollout.staleness=2")),
    "stale4": Setting("FP8 rollout, staleness 4", ("rollout.precision=fp8", "rollout.staleness=4")),
    "vllm_bf16": Setting("vLLM BF16 rollout, synchronous", ("rollout.engine=vllm", "rollout.precision=bf16"),
                         needs_vllm=True),
    "moe_fp8": Setting("MoE, FP8 rollout, no routing replay", ("model=builtin-moe", "rollout.precision=fp8")),
    "moe_fp8_replay": Setting("MoE, FP8 rollout, routing replay",
                              ("model=builtin-moe", "rollout.precision=fp8", "train.routing_replay=true")),
    "lr_stress": Setting(f"FP8 rollout, lr x{LR_STRESS:g}", ("rollout.precision=fp8",), lr_scale=LR_STRESS),
}

CORE = ("pg_is", "dapo", "spo", "dppo_tv", "drpo", "drpo_d0.15", "drpo_auto")  # the synchronous setting's
ABLATIONS = ("drpo_no_adv", "mask_drpo", "drpo_d0.5", "drpo_d2.5")  # SPO (in CORE) is the ratio-penalty ablation


@dataclass(frozen=True)
class Block:
    name: str
    claims: str
    methods: tuple[str, ...]
    settings: tuple[str, ...]
    seeds: int


# The sparse default grid, fixed before any of its runs was looked at, sized to the 4-hour budget on
# two cores (measured 0.82-0.91 s per step single-threaded; 190 runs x 150 steps). Every block has
# 5 seeds. Left out, to fit: the unregularised baseline outside the synchronous setting, DRPO at
# delta 0.15 under staleness 2 and on the MoE, SPO and DPPO on the vLLM engine (the engine's own
# start-up and the same bf16 mismatch as the HF engine's make it the least informative stress),
# and every method but PPO and DRPO with routing replay (it serves one comparison).
DEFAULT_BLOCKS: tuple[Block, ...] = (
    Block("sync", "(a) accuracy, (c) gradient-norm variance, (e) SPO, (g) time to accuracy, (h) adaptive delta",
          CORE, ("fp8",), 5),
    Block("ablation", "(d) advantage weighting, (f) delta 12.5 vs 2.5, mask-DRPO, delta sweep",
          ("drpo",) + ABLATIONS, ("fp8",), 5),
    Block("stale2", "(a), (b) FP8 + staleness 2, (c), (e), (g), (h)",
          ("dapo", "spo", "dppo_tv", "drpo", "drpo_auto"), ("stale2",), 5),
    Block("stale4", "(a), (b) FP8 + staleness 4, (c), (e), (g), (h)",
          ("dapo", "spo", "dppo_tv", "drpo", "drpo_d0.15", "drpo_auto"), ("stale4",), 5),
    Block("moe", "(a), (b) MoE with FP8 rollout (router flips), (c), (e), (g), (h), (i)",
          ("dapo", "spo", "dppo_tv", "drpo", "drpo_auto"), ("moe_fp8",), 5),
    Block("replay", "(i) MoE: DRPO without routing replay vs PPO with it", ("dapo", "drpo"), ("moe_fp8_replay",), 5),
    Block("lr_stress", "(a), (b) learning rate x3, (c), (e), (g), (h)",
          ("dapo", "spo", "dppo_tv", "drpo", "drpo_d0.15", "drpo_auto"), ("lr_stress",), 5),
    Block("vllm", "(g), (h) with the real vLLM engine (bf16)", ("dapo", "drpo", "drpo_auto"), ("vllm_bf16",), 5),
)

# Grid-wide overrides on top of the config defaults: quiet single-threaded workers, no TensorBoard,
# the default run's length (150 steps, where it plateaus), held-out accuracy every 10 steps (the
# resolution of time-to-accuracy) on the default 256 prompts, a checkpoint every 50 steps.
GRID_BASE = ("threads=1", "progress=false", "tensorboard=false", "train.steps=150", "eval.every=10",
             "save_every=50")

QUICK_BLOCKS = (Block("quick", "smoke test: DRPO against GRPO clip-higher, synchronous and staleness 1",
                      ("drpo", "dapo"), ("fp8", "stale1"), 2),)
QUICK_BASE = ("train.steps=12", "eval.every=4", "eval.prompts=64", "save_every=4")
SETTINGS["stale1"] = Setting("FP8 rollout, staleness 1", ("rollout.precision=fp8", "rollout.staleness=1"))


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
            "blocks": [{"name": b.name, "claims": b.claims, "methods": list(b.methods),
                        "settings": list(b.settings), "seeds": b.seeds,
                        "runs": [r.slug for r in self.runs_by_block[b.name]]} for b in self.blocks],
            "claims": [c.to_dict() for c in self.claims],
            "methods": {k: {"label": m.label, "family": m.family, "objective": m.objective,
                            "params": dict(m.params)} for k, m in METHODS.items() if self._uses("methods", k)},
            "settings": {k: {"label": s.label, "overrides": list(s.overrides), "lr_scale": s.lr_scale}
                         for k, s in SETTINGS.items() if self._uses("settings", k)},
            "runs": [{"slug": r.slug, "block": r.block, "method": r.method, "setting": r.setting,
                      "seed": r.seed, "overrides": list(r.overrides)} for r in self.runs],
        }

    def _uses(self, kind: str, key: str) -> bool:
        return any(key in getattr(b, kind) for b in self.blocks)


def expand(name: str, blocks: Sequence[Block], base: Sequence[str], claims: Sequence = ()) -> Grid:
    """Every (method, setting, seed) of every block -> its full override list (base first)."""
    base = tuple(base)
    base_lr = load_config(None, list(base)).train.lr
    grid = Grid(name, base, tuple(blocks), tuple(claims))
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
    steps      train.steps of every run (default: the grid's base, 150; 12 in quick)
    blocks     keep only these blocks (by name)
    overrides  extra base overrides for every run, e.g. ``["model=/path", "train.lr=2e-4"]``

    A YAML grid file holds ``base: [overrides]``, ``blocks: [{name, claims, methods, settings, seeds}]``
    with method and setting names from :data:`METHODS` and :data:`SETTINGS`, and optionally
    ``claims:``, a list of built-in claim ids and/or claim definitions (:mod:`drpo.experiments.claims`).
    """
    from drpo.experiments.claims import DEFAULT_CLAIMS, parse_claims

    if name == "default":
        chosen, base, claims = DEFAULT_BLOCKS, GRID_BASE, DEFAULT_CLAIMS
    elif name == "quick":
        chosen, base, claims = QUICK_BLOCKS, GRID_BASE + QUICK_BASE, DEFAULT_CLAIMS
    elif name.endswith((".yaml", ".yml")):
        chosen, base, raw_claims = _load_yaml_grid(Path(name))
        claims = parse_claims(raw_claims, where=f"grid file {name}")
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
    return expand(name, chosen, tuple(base) + tuple(extra), claims)


def _load_yaml_grid(path: Path) -> tuple[tuple[Block, ...], tuple[str, ...], list]:
    if not path.is_file():
        raise ValueError(f"grid file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"grid file {path} is not valid UTF-8 YAML: {str(e).splitlines()[0]}") from None
    try:
        blocks = tuple(Block(b["name"], b.get("claims", ""), tuple(b["methods"]), tuple(b["settings"]),
                             int(b.get("seeds", 5))) for b in data["blocks"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"grid file {path}: each block needs name, methods, settings ({e})") from None
    return blocks, GRID_BASE + tuple(data.get("base", [])), list(data.get("claims", []))


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
    lines.append(f"  total: {n} unique runs; claims: {', '.join(c.id for c in grid.claims) or 'none'}")
    if seconds_per_run is not None:
        hours = n * seconds_per_run / max(workers, 1) / 3600
        lines.append(f"  estimate: {n} x {seconds_per_run:g} s / {workers} worker(s) = {hours:.2f} h")
    return "\n".join(lines)
