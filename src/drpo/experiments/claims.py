"""The paper's claims as data, and the rules that turn runs into verdicts -- fixed before the grids ran.

A claim compares a *treatment* (methods, averaged per seed) with a *control* (likewise) on a metric,
over some settings (one *regime*: calm, or stressed). For the paired metrics each (setting, seed) with
both sides gives one paired value; the effect is their mean with a 95% Student-t interval [lo, hi] (seeds
of one setting share prompts and sampling seeds). Metrics and their units (the claimed direction is
always positive):

    final_acc     treatment - control, held-out accuracy (fraction; 0.03 = 3 points): mean of a run's last
                  3 evaluations; a diverged run counts 0 (drpo.experiments.results)
    grad_var      1 - var_T / var_C of the per-step gradient norm (pre-clipping) within a run
                  (computed on log(var_T / var_C), then mapped)
    time_to_acc   1 - steps_T / steps_C to reach the setting's target accuracy (step-0 accuracy +
                  TIME_FRACTION x (best method's mean final accuracy - step-0 accuracy)); a run that
                  never reaches it counts as (steps + eval interval), its censoring is reported
    collapse      the reduction of the collapse rate, p_C - p_T, over all runs of each side in the
                  regime's settings (drpo.training.collapse: ever collapsed, a diverged run counts); not
                  paired: counts k_T / n_T vs k_C / n_C, with a 95% Newcombe interval

Verdicts (``rule``):

    directional   contradicted    hi < 0
                  reproduced      lo > 0 and (no magnitude claimed, or hi >= magnitude)
                  smaller than claimed   lo > 0 and hi < magnitude
                  equivalent      -margin < lo and hi < margin (no effect, within the margin)
                  smaller than claimed   hi < magnitude (the claimed magnitude is ruled out)
                  inconclusive    otherwise, or fewer than 2 pairs
    equivalence   reproduced      -margin < lo and hi < margin
                  contradicted    lo > margin or hi < -margin
                  inconclusive    otherwise
    noninferior   reproduced      lo > -margin;  contradicted  hi < -margin;  inconclusive otherwise
    fewer         (collapse counts; one-sided Fisher exact tests at 5%)
                  reproduced      the treatment collapses less:  p(T < C) < 0.05
                  contradicted    it collapses more:             p(T > C) < 0.05
                  no collapse     neither side collapsed: this regime cannot test the claim
                  inconclusive    otherwise

For every claim the report also gives the minimum detectable effect at 80% power: for paired metrics
MDE = (t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n) in the claim's units, for collapse counts the
smallest reduction of the control's observed rate a one-sided 5% Fisher test detects with 80% power
(drpo.experiments.stats) -- what an inconclusive verdict rules out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from drpo.experiments.stats import Effect
from drpo.utils.errors import InputError

METRICS = ("final_acc", "grad_var", "time_to_acc", "collapse")
RULES = ("directional", "equivalence", "noninferior", "fewer")
LOG_METRICS = ("grad_var", "time_to_acc")  # relative effects, computed on the log scale
PCT_METRICS = LOG_METRICS + ("collapse",)   # shown in percent
TIME_FRACTION = 0.8
ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    metric: str
    treatment: tuple[str, ...]
    control: tuple[str, ...]
    settings: tuple[str, ...]
    rule: str = "directional"
    magnitude: Optional[float] = None  # the paper's claimed effect, in the metric's units
    margin: float = 0.03               # equivalence / non-inferiority margin, in the metric's units
    per_setting: bool = False          # one verdict per setting instead of one pooled verdict
    control_setting: Optional[str] = None  # take the control from this setting (paired by seed)
    regime: str = ""                   # calm / stressed: the conditions the settings stand for

    def __post_init__(self) -> None:
        where = f"claim {self.id!r}"
        if self.metric not in METRICS:
            raise InputError(f"{where}: unknown metric {self.metric!r}; known: {list(METRICS)}")
        if self.rule not in RULES:
            raise InputError(f"{where}: unknown rule {self.rule!r}; known: {list(RULES)}")
        if (self.metric == "collapse") != (self.rule == "fewer"):
            raise InputError(f"{where}: the collapse metric goes with the rule 'fewer', and only it")
        if not self.treatment or not self.control or not self.settings:
            raise InputError(f"{where}: needs treatment, control and settings")
        if not self.margin > 0:
            raise InputError(f"{where}: margin must be > 0")

    @property
    def label(self) -> str:
        return f"({self.id})" + (f" {self.regime}" if self.regime else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "Claim":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"{where}: claim {d.get('id', '?')!r} has unknown field(s) {unknown}; "
                             f"fields: {sorted(known)}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as e:
            raise InputError(f"{where}: claim {d.get('id', '?')!r}: {e}") from None


def decide_claims(calm: str, stressed: Sequence[str]) -> tuple[Claim, ...]:
    """Stage 2's claims: the paper's (a)-(g), ours (h), (j), (k), the paper's own comparison at one delta
    (l) on collapse and (m) on accuracy (added after stage 2, before any run of the sequential plan), each in
    the calm regime (``calm``) and the stressed one (``stressed`` cells pooled), and (i) on the MoE.
    Magnitudes are the paper's."""
    out = []
    for regime, settings in (("calm", (calm,)), ("stressed", tuple(stressed))):
        if not settings:
            continue
        kw = dict(settings=settings, regime=regime)
        out += [
            Claim("a", "DRPO reaches about 3 points higher accuracy than PPO/DPPO", "final_acc",
                  ("drpo",), ("dapo", "dppo_tv"), magnitude=0.03, **kw),
            Claim("b", "DRPO stays stable where ratio-based methods collapse (fewer collapses)", "collapse",
                  ("drpo",), ("dapo", "spo"), rule="fewer", **kw),
            Claim("c", "DRPO has 20-30% lower gradient-norm variance than ratio-based methods", "grad_var",
                  ("drpo",), ("dapo", "spo"), magnitude=0.20, **kw),
            Claim("d", "removing the advantage weighting |A| hurts", "final_acc", ("drpo",), ("drpo_no_adv",), **kw),
            Claim("e", "the ratio-based penalty (SPO) is worse than DRPO's", "final_acc", ("drpo",), ("spo",), **kw),
            Claim("g", "DRPO needs about 15% less training time to a given accuracy than PPO", "time_to_acc",
                  ("drpo",), ("dapo",), magnitude=0.15, **kw),
            Claim("h", "ours: the adaptive delta is within 1 point of DRPO's best fixed delta (12.5 or 0.15)",
                  "final_acc", ("drpo_auto",), ("best:drpo,drpo_d0.15",), rule="noninferior", margin=0.01,
                  per_setting=True, **kw),
            Claim("j", "geometry: at delta 12.5 DRPO's weight stays in [0.92, 1.08], so it performs like PG-IS",
                  "final_acc", ("drpo",), ("pg_is",), rule="equivalence", margin=0.03, **kw),
            Claim("k", "ours: at delta 0.15, where its trust region binds, DRPO collapses less than PG-IS",
                  "collapse", ("drpo_d0.15",), ("pg_is",), rule="fewer", **kw),
            # the paper's thesis posed at one trust region: its smooth regulariser against the hard mask
            Claim("l", "the paper's comparison at the same delta (0.15): DRPO collapses less than DPPO Binary-TV",
                  "collapse", ("drpo_d0.15",), ("dppo_tv",), rule="fewer", **kw),
            Claim("m", "the paper's comparison at the same delta (0.15): DRPO reaches higher accuracy than DPPO "
                  "Binary-TV", "final_acc", ("drpo_d0.15",), ("dppo_tv",), **kw),
        ]
    out.append(Claim("i", "ours: on the MoE, DRPO without routing replay is within 3 points of PPO (GRPO "
                          "clip-higher) with routing replay", "final_acc", ("drpo",), ("dapo",), ("moe_fp8",),
                     rule="noninferior", margin=0.03, control_setting="moe_fp8_replay"))
    return tuple(out)


def parse_claims(raw: Sequence[Any], where: str) -> tuple[Claim, ...]:
    """A grid file's ``claims``: mappings with the fields of :class:`Claim` (the built-in claims are
    made for the stage-2 grid's chosen cells by :func:`decide_claims`)."""
    out = []
    for item in raw:
        if isinstance(item, dict):
            out.append(Claim.from_dict(item, where))
        else:
            raise InputError(f"{where}: a claim is a mapping with the fields {sorted(Claim.__dataclass_fields__)}, "
                             f"got {item!r}")
    return tuple(out)


def verdict(claim: Claim, e: Effect) -> str:
    """The verdict of ``claim`` given its effect (the rules of the module docstring)."""
    if claim.rule == "fewer":
        if e.n == 0:
            return "not tested"
        if e.detail.startswith("0/") and " vs 0/" in e.detail:
            return "no collapse"
        if e.p_less < ALPHA:
            return "reproduced"
        return "contradicted" if e.p_greater < ALPHA else "inconclusive"
    if e.n < 2 or not math.isfinite(e.lo):
        return "inconclusive" if e.n else "not tested"
    m = claim.margin
    if claim.rule == "equivalence":
        if -m < e.lo and e.hi < m:
            return "reproduced"
        return "contradicted" if (e.lo > m or e.hi < -m) else "inconclusive"
    if claim.rule == "noninferior":
        return "reproduced" if e.lo > -m else "contradicted" if e.hi < -m else "inconclusive"
    if e.hi < 0:
        return "contradicted"
    if e.lo > 0:
        return "reproduced" if claim.magnitude is None or e.hi >= claim.magnitude else "smaller than claimed"
    if -m < e.lo and e.hi < m:
        return "equivalent"
    if claim.magnitude is not None and e.hi < claim.magnitude:
        return "smaller than claimed"
    return "inconclusive"
