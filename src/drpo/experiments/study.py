"""The study's vocabulary, at the bottom of :mod:`drpo.experiments` (it imports none of the others):

    Method   an objective with fixed parameters        ("drpo" = DRPO delta 12.5, "dapo" = GRPO clip-higher, ...)
    Setting  training conditions as config overrides   (a cell of the stability map, the MoE, ...)
    Cell     a cell of the stability map: learning rate x staleness x rollout precision; the one place
             that builds a cell's setting name (:attr:`Cell.name`) and its stress rank

Grids (:mod:`drpo.experiments.grids`), the stage-2 rule (:mod:`drpo.experiments.selection`), the claims
and the report name methods and settings by the keys of :data:`METHODS` and :data:`SETTINGS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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


@dataclass(frozen=True)
class Cell:
    """A cell of the stability map. Its setting is named :attr:`name` (e.g. 'lr3e-4_s4_fp8'); its map row
    is (staleness, precision); its stress :attr:`rank` is the sum of its rung indices (learning rate,
    staleness, and 1 for the 4-bit rollout)."""

    lr: float
    staleness: int
    precision: str

    def __post_init__(self) -> None:
        if self.lr not in LR_LADDER + (LR_EXTENSION,) or self.staleness not in STALE_LADDER \
                or self.precision not in PRECISIONS:
            raise ValueError(f"no map cell lr {self.lr:g}, staleness {self.staleness}, {self.precision}: the ladders "
                             f"are lr {LR_LADDER + (LR_EXTENSION,)}, staleness {STALE_LADDER}, {PRECISIONS}")

    @property
    def name(self) -> str:
        return f"lr{fmt_lr(self.lr)}_s{self.staleness}_{self.precision}"

    @property
    def rank(self) -> int:
        return ((LR_LADDER + (LR_EXTENSION,)).index(self.lr) + STALE_LADDER.index(self.staleness)
                + PRECISIONS.index(self.precision))

    @property
    def row(self) -> tuple[int, str]:
        return self.staleness, self.precision

    @property
    def label(self) -> str:
        return f"lr {fmt_lr(self.lr)}, staleness {self.staleness}, {self.precision.upper()} rollout"

    def setting(self) -> "Setting":
        return Setting(self.label, (f"rollout.precision={self.precision}", f"rollout.staleness={self.staleness}",
                                    f"train.lr={self.lr:g}"), cell=self)


@dataclass(frozen=True)
class Setting:
    """Training conditions as config overrides; a cell of the stability map also has its :class:`Cell`."""

    label: str
    overrides: tuple[str, ...] = ()
    needs_vllm: bool = False
    cell: Optional[Cell] = None


def map_cells(lrs: tuple[float, ...]) -> tuple[Cell, ...]:
    """learning rate x staleness at FP8, and the 4-bit rollout along the learning rate (staleness 0)."""
    return tuple(c for lr in lrs for c in [Cell(lr, n, "fp8") for n in STALE_LADDER] + [Cell(lr, 0, "fp4")])


CALM = Cell(1e-4, 0, "fp8").name  # the default run's conditions

SETTINGS: dict[str, Setting] = {
    **{c.name: c.setting() for c in map_cells(LR_LADDER + (LR_EXTENSION,))},
    "moe_fp8": Setting("MoE, FP8 rollout, no routing replay", ("model=builtin-moe", "rollout.precision=fp8")),
    "moe_fp8_replay": Setting("MoE, FP8 rollout, routing replay",
                              ("model=builtin-moe", "rollout.precision=fp8", "train.routing_replay=true")),
    "fp8": Setting("FP8 rollout (HF engine), synchronous", ("rollout.precision=fp8",)),
    "stale1": Setting("FP8 rollout, staleness 1", ("rollout.precision=fp8", "rollout.staleness=1")),
    "vllm_bf16": Setting("vLLM BF16 rollout, synchronous", ("rollout.engine=vllm", "rollout.precision=bf16"),
                         needs_vllm=True),
    # the real model's study (docs/compare/real/PLAN.md): its learning-rate ladder at the FP8 rollout, and the
    # staleness rung run only if PG-IS collapses nowhere on the ladder; the run size is the grid file's base
    **{f"real_lr{fmt_lr(lr)}_fp8": Setting(f"SmolLM2-135M, lr {fmt_lr(lr)}, FP8 rollout",
                                           ("rollout.precision=fp8", "rollout.staleness=0", f"train.lr={lr:g}"))
       for lr in (1e-5, 1e-4, 1e-3)},
    "real_lr1e-3_s4_fp8": Setting("SmolLM2-135M, lr 1e-3, staleness 4, FP8 rollout",
                                  ("rollout.precision=fp8", "rollout.staleness=4", "train.lr=0.001")),
}
