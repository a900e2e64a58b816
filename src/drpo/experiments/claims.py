"""The paper's claims as data, and the rules that turn runs into verdicts -- fixed before the grid ran.

A claim compares a *treatment* (methods, averaged per seed) with a *control* (likewise) on a metric,
over some settings. Each (setting, seed) with both sides gives one paired value; the effect is their
mean with a 95% Student-t interval [lo, hi] (seeds of one setting share prompts and sampling seeds).
Metrics and their units (the claimed direction is always positive):

    final_acc     treatment - control, held-out accuracy (fraction; 0.03 = 3 points). A run's final
                  accuracy is the mean of its last 3 evaluations; a diverged run counts 0.
    grad_var      1 - var_T / var_C of the per-step gradient norm (pre-clipping) within a run
                  (computed on log(var_T / var_C), then mapped)
    time_to_acc   1 - steps_T / steps_C to reach the setting's target accuracy (step-0 accuracy +
                  TIME_FRACTION x (best method's mean final accuracy - step-0 accuracy)); a run that
                  never reaches it counts as (steps + eval interval), its censoring is reported

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

For every claim the report also gives the minimum detectable effect at 80% power (two-sided 5%)
given the observed seed-to-seed spread: MDE = (t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n), in the
claim's units -- what an inconclusive verdict rules out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
from scipy import stats

METRICS = ("final_acc", "grad_var", "time_to_acc")
RULES = ("directional", "equivalence", "noninferior")
LOG_METRICS = ("grad_var", "time_to_acc")  # relative effects, computed on the log scale
TIME_FRACTION = 0.8
FINAL_EVALS = 3  # final accuracy = mean of the last 3 evaluations


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

    def __post_init__(self) -> None:
        where = f"claim {self.id!r}"
        if self.metric not in METRICS:
            raise ValueError(f"{where}: unknown metric {self.metric!r}; known: {list(METRICS)}")
        if self.rule not in RULES:
            raise ValueError(f"{where}: unknown rule {self.rule!r}; known: {list(RULES)}")
        if not self.treatment or not self.control or not self.settings:
            raise ValueError(f"{where}: needs treatment, control and settings")
        if not self.margin > 0:
            raise ValueError(f"{where}: margin must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "Claim":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: claim {d.get('id', '?')!r} has unknown field(s) {unknown}; "
                             f"fields: {sorted(known)}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as e:
            raise ValueError(f"{where}: claim {d.get('id', '?')!r}: {e}") from None


STRESS_FP8 = ("fp8", "stale2", "stale4", "moe_fp8", "lr_stress")
# a claim pools the settings it lists where the grid has both sides (e.g. no DPPO on vLLM)
ALL_CORE = STRESS_FP8 + ("vllm_bf16",)

# The paper's claims (Yao et al. 2026) with the magnitudes it reports, and one claim of ours.
DEFAULT_CLAIMS: tuple[Claim, ...] = (
    Claim("a", "DRPO reaches about 3 points higher accuracy than PPO/DPPO", "final_acc",
          ("drpo",), ("dapo", "dppo_tv"), ALL_CORE, magnitude=0.03),
    Claim("b", "under FP8 rollouts DRPO stays stable where ratio-based methods collapse", "final_acc",
          ("drpo",), ("dapo", "spo"), STRESS_FP8),
    Claim("c", "DRPO has 20-30% lower gradient-norm variance than ratio-based methods", "grad_var",
          ("drpo",), ("dapo", "spo"), ALL_CORE, magnitude=0.20),
    Claim("d", "removing the advantage weighting |A| hurts", "final_acc", ("drpo",), ("drpo_no_adv",), ("fp8",)),
    Claim("e", "the ratio-based penalty (SPO) is worse than DRPO's", "final_acc", ("drpo",), ("spo",), ALL_CORE),
    Claim("f", "delta 12.5 and delta 2.5 perform alike", "final_acc", ("drpo",), ("drpo_d2.5",), ("fp8",),
          rule="equivalence", margin=0.03),
    Claim("g", "DRPO needs about 15% less training time to a given accuracy than PPO", "time_to_acc",
          ("drpo",), ("dapo",), ALL_CORE, magnitude=0.15),
    Claim("h", "ours: the adaptive delta is within 1 point of DRPO's best fixed delta (12.5 or 0.15, where "
               "run) in every setting", "final_acc", ("drpo_auto",), ("best:drpo,drpo_d0.15",),
          ("fp8", "stale2", "stale4", "moe_fp8", "lr_stress", "vllm_bf16"), rule="noninferior", margin=0.01,
          per_setting=True),
    Claim("i", "ours: on the MoE, DRPO without routing replay is within 3 points of PPO (GRPO clip-higher) "
               "with routing replay", "final_acc", ("drpo",), ("dapo",), ("moe_fp8",), rule="noninferior",
          margin=0.03, control_setting="moe_fp8_replay"),
)
CLAIMS_BY_ID = {c.id: c for c in DEFAULT_CLAIMS}


def parse_claims(raw: Sequence[Any], where: str) -> tuple[Claim, ...]:
    """A grid file's ``claims``: built-in ids ('a'..'h') and/or claim mappings."""
    out = []
    for item in raw:
        if isinstance(item, str):
            if item not in CLAIMS_BY_ID:
                raise ValueError(f"{where}: unknown claim {item!r}; built-in claims: {sorted(CLAIMS_BY_ID)} "
                                 "(or define one as a mapping)")
            out.append(CLAIMS_BY_ID[item])
        elif isinstance(item, dict):
            out.append(Claim.from_dict(item, where))
        else:
            raise ValueError(f"{where}: a claim is an id or a mapping, got {item!r}")
    return tuple(out)


# ---------------------------------------------------------------------------- statistics
@dataclass
class Effect:
    """The paired effect of a claim: mean and 95% interval in the claim's units, the number of pairs,
    and the minimum detectable effect at 80% power."""

    mean: float
    lo: float
    hi: float
    n: int
    mde: float

    def fmt(self, pct: bool = False) -> str:
        if self.n == 0:
            return "-"
        f = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:+.3f}")
        if self.n < 2:
            return f"{f(self.mean)} (n=1)"
        return f"{f(self.mean)} [{f(self.lo)}, {f(self.hi)}] (n={self.n})"


def t_quantile(q: float, df: int) -> float:
    return float(stats.t.ppf(q, df))


def paired_effect(values: Sequence[float], log_scale: bool = False) -> Effect:
    """Mean, 95% t-interval and MDE of paired values; ``log_scale`` values are log(T / C) and the
    result is the relative reduction 1 - T / C (interval and MDE mapped)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = int(v.size)
    if n == 0:
        return Effect(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    m = float(v.mean())
    if n < 2:
        lo = hi = mde = float("nan")
    else:
        se = float(v.std(ddof=1)) / math.sqrt(n)
        half = t_quantile(0.975, n - 1) * se
        lo, hi = m - half, m + half
        mde = (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * se
    if log_scale:  # log(T/C) -> reduction 1 - T/C: decreasing, so the bounds swap
        return Effect(1 - math.exp(m), 1 - math.exp(hi), 1 - math.exp(lo), n, 1 - math.exp(-mde))
    return Effect(m, lo, hi, n, mde)


def verdict(claim: Claim, e: Effect) -> str:
    """The verdict of ``claim`` given its effect (the rules of the module docstring)."""
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
