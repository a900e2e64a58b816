"""The comparison report: tables, figures and a verdict per claim, computed from the runs' metrics.

Everything here is fixed before looking at data and applied by code:

* final accuracy   ``eval/accuracy`` at the run's last step. A run that diverged (NaN, status
                   ``failed``) delivers no model at its step budget: its final accuracy counts as 0.
* best accuracy    the highest ``eval/accuracy`` the run logged (diverged runs: before diverging).
* collapse         the run diverged, OR its final accuracy is below ``COLLAPSE_REL`` x its starting
                   (step 0) accuracy, OR it ends more than ``COLLAPSE_DROP`` below its own best.
* gradient-norm variance   the variance over steps of ``train/grad_norm`` (pre-clipping), per run.
* intervals        95% Student-t intervals over seeds; comparisons are paired by seed (runs with
                   the same seed see the same prompts) and use the seeds both sides have.
* verdicts         see :data:`RULES`, written into the report.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from drpo.objectives.metrics import BUCKET_NAMES, MISMATCH_KEYS
from drpo.training import run_io

COLLAPSE_REL = 0.5
COLLAPSE_DROP = 0.15
EQUIV_MARGIN = 0.05  # claim (f): |accuracy difference| that still counts as "alike"
GRAD_VAR_BAND = (0.20, 0.30)  # claim (c): the paper's 20-30% lower variance
MAIN = "fp8"
DRPO = "drpo"
RATIO_BASED = ("dapo", "spo")
BUCKETS = BUCKET_NAMES
MISMATCH = MISMATCH_KEYS
TRUST = ("beyond_pos_frac", "beyond_neg_frac", "neg_weight_frac", "inactive_frac")
BUCKET_COLS = ("token_frac", "beyond_frac", "neg_weight_frac", "inactive_frac")

RULES = f"""\
* **Directional claims** (a, b, d, e): the effect is a paired difference (DRPO minus the other side)
  with a 95% t-interval over seeds. *reproduced*: the interval lies above 0; *not reproduced*: it lies
  below 0; *inconclusive*: it contains 0 (or fewer than 2 paired seeds).
  (a) compares DRPO (delta 12.5) with every non-DRPO method of the main setting ({MAIN}): *reproduced* if
  every interval lies above 0, *not reproduced* if any lies below 0. The headline row is the strongest
  competitor (highest mean final accuracy).
  (b) effect = difference-in-differences of final accuracy, [FP8 - BF16 rollout] of DRPO minus the same
  for the ratio-based methods ({', '.join(RATIO_BASED)}, averaged per seed). *reproduced* needs its interval
  above 0 **and** the ratio-based methods' own FP8 - BF16 interval below 0 (they do degrade);
  *not reproduced* if the difference-in-differences interval lies below 0, or the ratio-based methods'
  FP8 - BF16 interval lies above 0 (no degradation to be stable against).
* **(c) gradient-norm variance**: per seed, log(var DRPO) - log(mean var of {', '.join(RATIO_BASED)}) in the
  main setting; its t-interval is mapped to a reduction 1 - exp(.). *reproduced*: the reduction interval
  lies above 0 and overlaps {GRAD_VAR_BAND[0]:.0%}-{GRAD_VAR_BAND[1]:.0%}; *not reproduced*: it lies below 0, or
  above 0 but outside {GRAD_VAR_BAND[0]:.0%}-{GRAD_VAR_BAND[1]:.0%} (the magnitude differs); else *inconclusive*.
* **(f) equivalence**: the paired final-accuracy difference of delta 12.5 and 2.5. *reproduced*: its
  interval lies inside +-{EQUIV_MARGIN:.2f}; *not reproduced*: outside that and excluding 0; else *inconclusive*.
* *not tested*: the grid holds no runs for one side of the comparison.
"""


# ---------------------------------------------------------------------------- statistics
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t (table to df=30, then the Cornish-Fisher expansion)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Estimate:
    mean: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if not math.isfinite(self.lo):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] (n={self.n})"


def mean_ci(values) -> Estimate:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    m = float(v.mean())
    if v.size < 2:
        return Estimate(m, float("nan"), float("nan"), 1)
    h = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Estimate(m, m - h, m + h, int(v.size))


def paired(a: dict[int, float], b: dict[int, float]) -> Estimate:
    """Mean and interval of a[seed] - b[seed] over the seeds both have."""
    return mean_ci([a[s] - b[s] for s in sorted(set(a) & set(b))])


def directional(e: Estimate) -> str:
    if e.n == 0:
        return "not tested"
    if e.n < 2 or not math.isfinite(e.lo):
        return "inconclusive"
    return "reproduced" if e.lo > 0 else "not reproduced" if e.hi < 0 else "inconclusive"


# ---------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    slug: str
    method: str
    setting: str
    seed: int
    state: str
    rows: list[dict] = field(repr=False)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], v) for r in self.rows if (v := _num(r.get(key))) is not None]

    def step_mean(self, key: str) -> Optional[float]:
        vals = [v for _, v in self.series(key) if math.isfinite(v)]
        return float(np.mean(vals)) if vals else None

    @property
    def diverged(self) -> bool:
        return self.state == "failed"

    @property
    def initial_acc(self) -> Optional[float]:
        acc = self.series("eval/accuracy")
        return acc[0][1] if acc and acc[0][0] == 0 else None

    @property
    def final_acc(self) -> Optional[float]:
        if self.diverged:
            return 0.0
        acc = self.series("eval/accuracy")
        return acc[-1][1] if acc else None

    @property
    def best_acc(self) -> Optional[float]:
        acc = [v for _, v in self.series("eval/accuracy")]
        return max(acc) if acc else None

    @property
    def collapsed(self) -> bool:
        if self.diverged:
            return True
        final, init, best = self.final_acc, self.initial_acc, self.best_acc
        if final is None:
            return False
        return (init is not None and final < COLLAPSE_REL * init) or (best is not None and final < best - COLLAPSE_DROP)

    @property
    def grad_var(self) -> Optional[float]:
        g = [v for _, v in self.series("train/grad_norm") if math.isfinite(v)]
        return float(np.var(g, ddof=1)) if len(g) >= 2 else None


def _num(v) -> Optional[float]:
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # NaN/inf are written as strings
        try:
            return float(v)
        except ValueError:
            return None
    return None


def load_runs(out: Path) -> tuple[dict, list[RunResult], list[str]]:
    """(manifest, runs that finished or diverged, slugs of runs that have not ended)."""
    manifest = json.loads((out / "grid.json").read_text())
    done, pending = [], []
    for r in manifest["runs"]:
        run_dir = out / r["slug"]
        state = run_io.read_status(run_dir).get("state")
        if state in ("finished", "failed"):
            done.append(RunResult(r["slug"], r["method"], r["setting"], r["seed"], state,
                                  run_io.read_metrics(run_dir / "metrics.jsonl")))
        else:
            pending.append(r["slug"])
    return manifest, done, pending


class Runs:
    """Runs indexed by (setting, method) -> {seed: RunResult}."""

    def __init__(self, runs: list[RunResult]) -> None:
        self.by: dict[tuple[str, str], dict[int, RunResult]] = defaultdict(dict)
        for r in runs:
            self.by[(r.setting, r.method)][r.seed] = r

    def per_seed(self, setting: str, method: str, f: Callable[[RunResult], Optional[float]]) -> dict[int, float]:
        return {s: v for s, r in self.by.get((setting, method), {}).items() if (v := f(r)) is not None}

    def methods(self, setting: str) -> list[str]:
        return [m for (s, m) in self.by if s == setting]

    def settings(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.by))


# ---------------------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    claim: str
    comparison: str
    effect: str
    verdict: str


def _final(r: RunResult) -> Optional[float]:
    return r.final_acc


def verdicts(runs: Runs, methods: dict) -> list[Verdict]:
    out = [_claim_a(runs, methods), _claim_b(runs), _claim_c(runs)]
    for claim, text, other in (("(d) removing advantage weighting hurts", "DRPO - DRPO w/o adv. weighting", "drpo_no_adv"),
                               ("(e) the ratio-based penalty (SPO) is worse", "DRPO - SPO", "spo")):
        e = paired(runs.per_seed(MAIN, DRPO, _final), runs.per_seed(MAIN, other, _final))
        out.append(Verdict(claim, f"{text}, final accuracy, {MAIN}", e.fmt(), directional(e)))
    e = paired(runs.per_seed(MAIN, DRPO, _final), runs.per_seed(MAIN, "drpo_d2.5", _final))
    if e.n < 2 or not math.isfinite(e.lo):
        v = "not tested" if e.n == 0 else "inconclusive"
    elif -EQUIV_MARGIN < e.lo and e.hi < EQUIV_MARGIN:
        v = "reproduced"
    else:
        v = "not reproduced" if (e.lo > 0 or e.hi < 0) else "inconclusive"
    out.append(Verdict("(f) delta 12.5 and 2.5 behave alike", f"delta 12.5 - delta 2.5, final accuracy, {MAIN} "
                       f"(margin +-{EQUIV_MARGIN})", e.fmt(), v))
    return out


def _claim_a(runs: Runs, methods: dict) -> Verdict:
    drpo = runs.per_seed(MAIN, DRPO, _final)
    rivals = [m for m in runs.methods(MAIN) if methods.get(m, {}).get("family") != "drpo"]
    diffs = {m: paired(drpo, runs.per_seed(MAIN, m, _final)) for m in rivals}
    diffs = {m: e for m, e in diffs.items() if e.n > 0}
    claim = "(a) DRPO reaches the highest accuracy"
    if not drpo or not diffs:
        return Verdict(claim, f"DRPO - each other method, {MAIN}", "-", "not tested")
    words = [directional(e) for e in diffs.values()]
    v = ("not reproduced" if "not reproduced" in words else
         "reproduced" if all(w == "reproduced" for w in words) else "inconclusive")
    best = max(diffs, key=lambda m: mean_ci(runs.per_seed(MAIN, m, _final).values()).mean)
    detail = "; ".join(f"vs {m}: {e.fmt()}" for m, e in diffs.items())
    return Verdict(claim, f"DRPO - strongest rival ({best}), final accuracy, {MAIN}",
                   f"{diffs[best].fmt()} (all: {detail})", v)


def _fp8_minus_bf16(runs: Runs, method: str) -> dict[int, float]:
    a, b = runs.per_seed(MAIN, method, _final), runs.per_seed("bf16", method, _final)
    return {s: a[s] - b[s] for s in set(a) & set(b)}


def _seed_mean(dicts: list[dict[int, float]]) -> dict[int, float]:
    """Per seed, the mean over the dicts that all have that seed."""
    seeds = set.intersection(*(set(d) for d in dicts)) if dicts else set()
    return {s: float(np.mean([d[s] for d in dicts])) for s in seeds}


def _claim_b(runs: Runs) -> Verdict:
    claim = "(b) under FP8 rollout DRPO stays stable where ratio-based methods degrade"
    ratio = _seed_mean([d for m in RATIO_BASED if (d := _fp8_minus_bf16(runs, m))])
    did = paired(_fp8_minus_bf16(runs, DRPO), ratio)
    ratio_drop = mean_ci(ratio.values())
    if did.n == 0:
        v = "not tested"
    elif did.n >= 2 and math.isfinite(did.lo) and (did.hi < 0 or ratio_drop.lo > 0):
        v = "not reproduced"
    elif directional(did) == "reproduced" and directional(ratio_drop) == "not reproduced":
        v = "reproduced"
    else:
        v = "inconclusive"
    return Verdict(claim, "[FP8 - BF16] DRPO minus [FP8 - BF16] ratio-based, final accuracy",
                   f"{did.fmt()} (ratio-based FP8 - BF16: {ratio_drop.fmt()}; "
                   f"DRPO FP8 - BF16: {mean_ci(_fp8_minus_bf16(runs, DRPO).values()).fmt()})", v)


def _claim_c(runs: Runs) -> Verdict:
    claim = "(c) gradient-norm variance 20-30% lower than ratio-based methods"
    gv = lambda r: r.grad_var if r.grad_var and r.grad_var > 0 else None  # noqa: E731
    ratio = _seed_mean([d for m in RATIO_BASED if (d := runs.per_seed(MAIN, m, gv))])
    drpo = runs.per_seed(MAIN, DRPO, gv)
    e = paired({s: math.log(v) for s, v in drpo.items()}, {s: math.log(v) for s, v in ratio.items()})
    if e.n == 0:
        return Verdict(claim, "1 - var(DRPO)/var(ratio-based)", "-", "not tested")
    red = Estimate(1 - math.exp(e.mean), 1 - math.exp(e.hi), 1 - math.exp(e.lo), e.n)
    lo_band, hi_band = GRAD_VAR_BAND
    if e.n < 2 or not math.isfinite(red.lo):
        v = "inconclusive"
    elif red.hi < 0:
        v = "not reproduced"
    elif red.lo > 0:
        v = "reproduced" if red.lo <= hi_band and red.hi >= lo_band else "not reproduced"
    else:
        v = "inconclusive"
    return Verdict(claim, f"reduction 1 - var(DRPO)/var({'+'.join(RATIO_BASED)}), {MAIN}", red.fmt(), v)


# ---------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(runs: dict[int, RunResult], key: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in runs.values():
        for step, v in r.series(key):
            if math.isfinite(v):
                by_step[step].append(v)
    steps = sorted(by_step)
    est = [mean_ci(by_step[s]) for s in steps]
    mean = np.array([e.mean for e in est])
    lo = np.array([e.lo if math.isfinite(e.lo) else e.mean for e in est])
    hi = np.array([e.hi if math.isfinite(e.hi) else e.mean for e in est])
    return steps, mean, lo, hi


def plot_curves(runs: Runs, setting: str, methods: list[str], labels: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for ax, key, title in ((axes[0], "eval/accuracy", "held-out accuracy"), (axes[1], "reward/mean", "train reward")):
        for i, m in enumerate(methods):
            steps, mean, lo, hi = _curve(runs.by.get((setting, m), {}), key)
            if not steps:
                continue
            line, = ax.plot(steps, mean, marker="o" if key == "eval/accuracy" else None, ms=3,
                            ls=("-", "--")[i // 10 % 2], label=labels.get(m, m))
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set(title=f"{title} ({setting}; mean, 95% CI over seeds)", xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratio_vs_shift(all_runs: list[RunResult], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5), constrained_layout=True)
    for b in BUCKETS:
        xs, ys = [], []
        for r in all_runs:
            for row in r.rows:
                x, y = _num(row.get(f"obj/{b}/abs_shift_mean")), _num(row.get(f"obj/{b}/abs_ratio_dev_mean"))
                if x and y and math.isfinite(x) and math.isfinite(y):
                    xs.append(x)
                    ys.append(y)
        if xs:
            ax.scatter(xs, ys, s=6, alpha=0.4, label=f"{b} ({len(xs)} steps)")
    ax.set(xscale="log", yscale="log", xlabel="mean |pi - mu| (probability shift)", ylabel="mean |r - 1| (ratio deviation)",
           title="ratio deviation vs probability shift, per mu bucket")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- tables
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pooled(runs: dict[int, RunResult], key: str) -> Estimate:
    return mean_ci([r.step_mean(key) for r in runs.values()])


def write_report(out: Path, report_dir: Path, command: str) -> Path:
    """Read the runs of the grid in ``out`` and write ``report_dir/README.md`` with its figures."""
    manifest, done, pending = load_runs(Path(out))
    report_dir.mkdir(parents=True, exist_ok=True)
    runs = Runs(done)
    methods, settings = manifest.get("methods", {}), manifest.get("settings", {})
    labels = {k: v["label"] for k, v in methods.items()}
    made_by = f"Made by `{command}`."
    md = [f"# Comparison report: grid `{manifest['name']}`", "",
          f"{len(done)} runs ended ({sum(r.diverged for r in done)} diverged), {len(pending)} not ended "
          f"(left out). Base overrides: `{' '.join(manifest['base'])}`. Rebuild with `{command}`.", "",
          "## Definitions (fixed before looking at data)", "",
          "* **final accuracy**: held-out `eval/accuracy` at the last step; a diverged (NaN) run counts as 0.",
          "* **best accuracy**: the highest held-out accuracy a run logged.",
          f"* **collapse**: the run diverged (NaN), or its final accuracy is below {COLLAPSE_REL:g} x its step-0 "
          f"accuracy, or more than {COLLAPSE_DROP:g} (absolute) below its own best.",
          "* **gradient-norm variance**: variance over steps of `train/grad_norm` (before clipping) within a run, "
          "then mean and interval over seeds.",
          "* intervals are 95% Student-t intervals over seeds, shown as `mean [lo, hi]`; differences are paired by seed.",
          "", "## Verdicts", "", RULES, "",
          _table(["claim", "comparison", "effect: mean [95% CI]", "verdict"],
                 [[v.claim, v.comparison, v.effect, f"**{v.verdict}**"] for v in verdicts(runs, methods)]), ""]

    md += ["## Accuracy and collapses", ""]
    for s in runs.settings():
        md += [f"### {settings.get(s, {}).get('label', s)} (`{s}`)", ""]
        rows = []
        for m in runs.methods(s):
            rr = runs.by[(s, m)]
            rows.append([labels.get(m, m), str(len(rr)), mean_ci(r.initial_acc for r in rr.values()).fmt(),
                         mean_ci(r.final_acc for r in rr.values()).fmt(), mean_ci(r.best_acc for r in rr.values()).fmt(),
                         f"{sum(r.collapsed for r in rr.values())}/{len(rr)}",
                         f"{sum(r.diverged for r in rr.values())}/{len(rr)}"])
        md += [_table(["method", "seeds", "step-0 acc", "final acc", "best acc", "collapses", "diverged"], rows), ""]

    md += ["## Curves", ""]
    for b in manifest["blocks"]:
        for s in b["settings"]:
            fig = plot_curves(runs, s, b["methods"], labels, report_dir / f"curves_{b['name']}_{s}.png")
            md += [f"![curves {b['name']} {s}]({fig.name})", "",
                   f"*Block `{b['name']}`, setting `{s}`: held-out accuracy and train reward, mean and 95% interval "
                   f"over seeds. {made_by}*", ""]

    md += ["## Gradient-norm variance", "",
           _table(["setting", "method", "var(grad_norm) over steps", "mean grad_norm"],
                  [[s, labels.get(m, m), mean_ci(r.grad_var for r in runs.by[(s, m)].values()).fmt(digits=4),
                    _pooled(runs.by[(s, m)], "train/grad_norm").fmt()]
                   for s in runs.settings() for m in runs.methods(s)]), ""]

    md += ["## Rollout mismatch (rollout engine vs trainer, first minibatch of each step)", "",
           _table(["setting"] + [f"mismatch/{k}" for k in MISMATCH],
                  [[s] + [mean_ci(r.step_mean(f"mismatch/{k}") for m in runs.methods(s) for r in runs.by[(s, m)].values())
                          .fmt(digits=4) for k in MISMATCH] for s in runs.settings()]), ""]

    md += ["## Tokens beyond the trust region and with corrective (negative) weight", "",
           "Token-weighted means over the steps of each run (beyond = |pi - mu| > 0.15 for every method), "
           "then mean and interval over seeds.", "",
           _table(["setting", "method"] + list(TRUST),
                  [[s, labels.get(m, m)] + [_pooled(runs.by[(s, m)], f"obj/{k}").fmt(digits=4) for k in TRUST]
                   for s in runs.settings() for m in runs.methods(s)]), "",
           f"By behaviour probability mu, setting `{MAIN}`:", "",
           _table(["method", "bucket"] + list(BUCKET_COLS),
                  [[labels.get(m, m), b] + [_pooled(runs.by[(MAIN, m)], f"obj/{b}/{k}").fmt(digits=4) for k in BUCKET_COLS]
                   for m in runs.methods(MAIN) for b in BUCKETS]), ""]

    fig = plot_ratio_vs_shift(done, report_dir / "ratio_vs_shift.png")
    shift = {b: mean_ci(r.step_mean(f"obj/{b}/abs_shift_mean") for r in done) for b in BUCKETS}
    dev = {b: mean_ci(r.step_mean(f"obj/{b}/abs_ratio_dev_mean") for r in done) for b in BUCKETS}
    md += ["## Is the ratio a good proxy for the probability shift?", "",
           "Each point is one step of one run (all settings and methods): the token-weighted mean \\|r - 1\\| "
           "against the mean \\|pi - mu\\| of the tokens in one behaviour-probability bucket. Were the ratio a "
           "faithful proxy, the buckets would lie on one curve; the paper argues that rare tokens show a far "
           "larger ratio deviation for the same probability shift. The last column is the ratio of the two means.", "",
           _table(["bucket", "mean \\|pi - mu\\|", "mean \\|r - 1\\|", "\\|r - 1\\| / \\|pi - mu\\|"],
                  [[b, shift[b].fmt(digits=4), dev[b].fmt(digits=4),
                    f"{dev[b].mean / shift[b].mean:.1f}" if shift[b].n and shift[b].mean > 0 else "-"]
                   for b in BUCKETS]), "",
           f"![ratio vs shift]({fig.name})", "", f"*|r - 1| against |pi - mu| per mu bucket, from the runs' rollouts. {made_by}*", ""]

    md += ["## Grid", ""] + [f"* `{b['name']}` ({len(b['runs'])} runs): {b['claims']}" for b in manifest["blocks"]]
    if pending:
        md += ["", "Runs not ended (left out): " + ", ".join(f"`{p}`" for p in pending)]
    path = report_dir / "README.md"
    path.write_text("\n".join(md) + "\n")
    return path
