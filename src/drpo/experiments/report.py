"""The comparison report: tables, figures and a verdict per claim, computed from the runs' metrics.

Everything here is fixed before looking at data and applied by code:

* final accuracy   the mean of ``eval/accuracy`` over the run's last 3 evaluations (less sampling
                   noise than one). A run that diverged (NaN, status ``failed``) delivers no model
                   at its step budget: its final accuracy counts as 0.
* best accuracy    the highest ``eval/accuracy`` the run logged (diverged runs: before diverging).
* collapse         the run diverged, OR its last accuracy is below ``COLLAPSE_REL`` x its starting
                   (step 0) accuracy, OR it ends more than ``COLLAPSE_DROP`` below its own best.
* gradient-norm variance   the variance over steps of ``train/grad_norm`` (pre-clipping), per run.
* time to accuracy steps to the setting's target (see :mod:`drpo.experiments.claims`).
* intervals        95% Student-t intervals over seeds; comparisons are paired by seed (runs with
                   the same seed see the same prompts) and use the seeds both sides have.
* verdicts         the claims and rules of :mod:`drpo.experiments.claims`, written into the report.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from drpo.experiments import claims as C
from drpo.objectives.metrics import BUCKET_NAMES, MISMATCH_KEYS
from drpo.training import run_io

COLLAPSE_REL = 0.5
COLLAPSE_DROP = 0.15
BUCKETS = BUCKET_NAMES
TRUST = ("beyond_pos_frac", "beyond_neg_frac", "neg_weight_frac", "inactive_frac")
BUCKET_COLS = ("token_frac", "beyond_frac", "neg_weight_frac", "inactive_frac")


# ---------------------------------------------------------------------------- statistics
def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    return C.t_quantile(0.975, df)


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
        """Mean of the last :data:`claims.FINAL_EVALS` evaluations (0 for a diverged run)."""
        if self.diverged:
            return 0.0
        acc = [v for step, v in self.series("eval/accuracy") if step > 0]
        return float(np.mean(acc[-C.FINAL_EVALS:])) if acc else None

    @property
    def last_acc(self) -> Optional[float]:
        acc = self.series("eval/accuracy")
        return 0.0 if self.diverged else (acc[-1][1] if acc else None)

    def steps_to(self, target: float, censored_at: int) -> int:
        """The first evaluation step whose accuracy reaches ``target``; ``censored_at`` if none does."""
        for step, v in self.series("eval/accuracy"):
            if step > 0 and v >= target:
                return step
        return censored_at

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.rows), default=0)

    @property
    def eval_every(self) -> int:
        steps = [s for s, _ in self.series("eval/accuracy") if s > 0]
        return steps[1] - steps[0] if len(steps) >= 2 else (steps[0] if steps else 1)

    @property
    def best_acc(self) -> Optional[float]:
        acc = [v for _, v in self.series("eval/accuracy")]
        return max(acc) if acc else None

    @property
    def collapsed(self) -> bool:
        if self.diverged:
            return True
        final, init, best = self.last_acc, self.initial_acc, self.best_acc
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
    claim: C.Claim
    scope: str        # the settings the effect pools
    effect: C.Effect
    verdict: str
    detail: str = ""  # e.g. the control chosen as "best", censored runs


def _side(runs: "Runs", setting: str, names: tuple[str, ...], f: Callable[["RunResult"], Optional[float]]
          ) -> tuple[dict[int, float], str]:
    """Per seed, the mean of ``f`` over the methods ``names`` (all must have the seed); a name
    'best:m1,m2' picks, in this setting, the method with the highest mean final accuracy."""
    label = "+".join(names)
    if len(names) == 1 and names[0].startswith("best:"):
        cands = [m for m in names[0][5:].split(",") if runs.by.get((setting, m))]
        if not cands:
            return {}, label
        best = max(cands, key=lambda m: np.mean([v for v in runs.per_seed(setting, m, _final).values()]))
        names, label = (best,), best
    per = [runs.per_seed(setting, m, f) for m in names]
    if not per or not all(per):
        return {}, label
    seeds = set.intersection(*(set(d) for d in per))
    return {s: float(np.mean([d[s] for d in per])) for s in seeds}, label


def _final(r: "RunResult") -> Optional[float]:
    return r.final_acc


def time_target(runs: "Runs", setting: str) -> Optional[float]:
    """The setting's target accuracy: step-0 accuracy + TIME_FRACTION x (best mean final - step-0)."""
    finals = [np.mean(list(d.values())) for m in runs.methods(setting) if (d := runs.per_seed(setting, m, _final))]
    starts = [r.initial_acc for m in runs.methods(setting) for r in runs.by[(setting, m)].values()
              if r.initial_acc is not None]
    if not finals or not starts:
        return None
    start = float(np.mean(starts))
    return start + C.TIME_FRACTION * (max(finals) - start)


def _metric(runs: "Runs", claim: C.Claim, setting: str) -> Callable[["RunResult"], Optional[float]]:
    if claim.metric == "final_acc":
        return _final
    if claim.metric == "grad_var":
        return lambda r: math.log(r.grad_var) if r.grad_var and r.grad_var > 0 else None
    target = time_target(runs, setting)
    if target is None:
        return lambda r: None
    return lambda r: math.log(r.steps_to(target, r.last_step + r.eval_every))


def claim_effect(runs: "Runs", claim: C.Claim, settings: tuple[str, ...]) -> tuple[C.Effect, str]:
    """The paired values of ``claim`` over ``settings`` x seeds, and its effect."""
    values, notes = [], []
    for s in settings:
        f = _metric(runs, claim, s)  # (the time target of the treatment's setting serves both sides)
        t, _ = _side(runs, s, claim.treatment, f)
        c, label = _side(runs, claim.control_setting or s, claim.control, f)
        values += [t[k] - c[k] for k in sorted(set(t) & set(c))]
        if claim.control[0].startswith("best:") and c:
            notes.append(f"{s}: best fixed = {label}")
    return C.paired_effect(values, log_scale=claim.metric in C.LOG_METRICS), "; ".join(notes)


def verdicts(runs: "Runs", claims: tuple[C.Claim, ...]) -> list[Verdict]:
    out = []
    for claim in claims:
        present = tuple(s for s in claim.settings if s in runs.settings())
        scopes = [(s,) for s in present] if claim.per_setting else [present]
        for scope in scopes or [claim.settings]:
            e, detail = claim_effect(runs, claim, scope)
            out.append(Verdict(claim, ", ".join(scope), e, C.verdict(claim, e), detail))
    return out


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


def plot_delta(runs: Runs, settings: list[str], path: Path) -> Optional[Path]:
    """The adaptive delta (obj/delta) over steps, mean over seeds, one line per setting."""
    if not any(runs.by.get((s, "drpo_auto")) for s in settings):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for s in settings:
        steps, mean, lo, hi = _curve(runs.by.get((s, "drpo_auto"), {}), "obj/delta")
        if steps:
            line, = ax.plot(steps, mean, label=s)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set(yscale="log", xlabel="step", ylabel="delta", title="adaptive delta (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _claims_of(manifest: dict) -> tuple[C.Claim, ...]:
    return tuple(C.Claim.from_dict(d, "grid.json") for d in manifest.get("claims", []))


def _verdict_rows(vs: list[Verdict], labels: dict) -> list[list[str]]:
    rows = []
    for v in vs:
        c = v.claim
        pct = c.metric in C.LOG_METRICS
        def side(names):
            return " + ".join(f"the best of {', '.join(labels.get(m, m) for m in n[5:].split(','))}"
                              if n.startswith("best:") else labels.get(n, n) for n in names)

        claimed = ("alike (margin " + (f"{100 * c.margin:.0f}%" if pct else f"{c.margin:.2f}") + ")"
                   if c.rule == "equivalence" else
                   f"within {c.margin:.2f} (non-inferior)" if c.rule == "noninferior" else
                   "> 0" if c.magnitude is None else (f"{100 * c.magnitude:+.0f}%" if pct else f"{c.magnitude:+.2f}"))
        mde = "-" if not math.isfinite(v.effect.mde) else (f"{100 * v.effect.mde:.1f}%" if pct else f"{v.effect.mde:.3f}")
        control = side(c.control) + (f" (in {c.control_setting})" if c.control_setting else "")
        rows.append([f"({c.id})", c.text, f"{side(c.treatment)} vs {control}; {c.metric}; {v.scope}"
                     + (f" ({v.detail})" if v.detail else ""), claimed, v.effect.fmt(pct=pct), mde,
                     f"**{v.verdict}**"])
    return rows


def write_report(out: Path, report_dir: Path, command: str) -> Path:
    """Read the runs of the grid in ``out`` and write ``report_dir/README.md`` with its figures."""
    manifest, done, pending = load_runs(Path(out))
    report_dir.mkdir(parents=True, exist_ok=True)
    runs = Runs(done)
    methods, settings = manifest.get("methods", {}), manifest.get("settings", {})
    labels = {k: v["label"] for k, v in methods.items()}
    slabel = lambda s: settings.get(s, {}).get("label", s)  # noqa: E731
    made_by = f"Made by `{command}`."
    claims = _claims_of(manifest)
    vs = verdicts(runs, claims)
    md = [f"# Comparison report: grid `{manifest['name']}`", "",
          f"{len(done)} runs ended ({sum(r.diverged for r in done)} diverged), {len(pending)} not ended "
          f"(left out). Base overrides: `{' '.join(manifest['base'])}`. Rebuild with `{command}`.", "",
          "## Verdicts", "",
          "Effects are paired differences (treatment minus control, same seed and setting) with 95% t-intervals; "
          "accuracy in fractions (0.03 = 3 points), variance and time as relative reductions. MDE = the "
          "smallest effect this many pairs detect with 80% power at the observed spread: an inconclusive "
          "verdict rules out effects larger than about the MDE.", "",
          _table(["claim", "text", "comparison (metric; settings)", "claimed", "effect: mean [95% CI]",
                  "MDE (80%)", "verdict"], _verdict_rows(vs, labels)), "",
          "### Rules (fixed before the grid ran)", "", "```", (C.__doc__ or "").strip(), "```", "",
          "## Definitions", "",
          f"* **final accuracy**: mean held-out `eval/accuracy` of the last {C.FINAL_EVALS} evaluations; "
          "a diverged (NaN) run counts as 0.",
          "* **best accuracy**: the highest held-out accuracy a run logged.",
          f"* **collapse**: the run diverged (NaN), or its last accuracy is below {COLLAPSE_REL:g} x its step-0 "
          f"accuracy, or more than {COLLAPSE_DROP:g} (absolute) below its own best.",
          "* **gradient-norm variance**: variance over steps of `train/grad_norm` (before clipping) within a run.",
          f"* **time to accuracy**: the first evaluation step at which a run reaches the setting's target, step-0 "
          f"accuracy + {C.TIME_FRACTION:g} x (best method's mean final accuracy - step-0 accuracy); never: "
          "last step + one evaluation interval (censored).",
          "* intervals are 95% Student-t intervals over seeds, shown as `mean [lo, hi]`.", ""]

    md += ["## Accuracy, collapses and time to accuracy", ""]
    for s in runs.settings():
        target = time_target(runs, s)
        md += [f"### {slabel(s)} (`{s}`)", "",
               f"Target for time to accuracy: {target:.3f}." if target is not None else "", ""]
        rows = []
        for m in runs.methods(s):
            rr = runs.by[(s, m)]
            steps = [r.steps_to(target, r.last_step + r.eval_every) for r in rr.values()] if target is not None else []
            censored = sum(st > r.last_step for st, r in zip(steps, rr.values()))
            rows.append([labels.get(m, m), str(len(rr)), mean_ci(r.initial_acc for r in rr.values()).fmt(),
                         mean_ci(r.final_acc for r in rr.values()).fmt(), mean_ci(r.best_acc for r in rr.values()).fmt(),
                         f"{sum(r.collapsed for r in rr.values())}/{len(rr)}",
                         f"{sum(r.diverged for r in rr.values())}/{len(rr)}",
                         (mean_ci(steps).fmt(digits=0) + (f", {censored} censored" if censored else "")) if steps else "-"])
        md += [_table(["method", "seeds", "step-0 acc", "final acc", "best acc", "collapses", "diverged",
                       "steps to target"], rows), ""]

    md += ["## Curves", ""]
    for s in runs.settings():
        fig = plot_curves(runs, s, runs.methods(s), labels, report_dir / f"curves_{s}.png")
        md += [f"![curves {s}]({fig.name})", "",
               f"*{slabel(s)}: held-out accuracy and train reward, mean and 95% interval over seeds. {made_by}*", ""]
    fig = plot_delta(runs, runs.settings(), report_dir / "adaptive_delta.png")
    if fig is not None:
        md += ["### The adaptive delta", "", f"![adaptive delta]({fig.name})", "",
               f"*obj/delta of DRPO (adaptive delta) per setting. {made_by}*", ""]

    md += ["## Gradient-norm variance", "",
           _table(["setting", "method", "var(grad_norm) over steps", "mean grad_norm"],
                  [[s, labels.get(m, m), mean_ci(r.grad_var for r in runs.by[(s, m)].values()).fmt(digits=4),
                    _pooled(runs.by[(s, m)], "train/grad_norm").fmt()]
                   for s in runs.settings() for m in runs.methods(s)]), ""]

    keys = [k for k in [f"mismatch/{k}" for k in MISMATCH_KEYS] + ["rollout/router_flip_frac"]
            if any(k in row for r in done for row in r.rows)]  # the columns these runs logged
    md += ["## Rollout mismatch (rollout engine vs trainer, first minibatch of each step)", "",
           "Mean over steps of each run, then over the runs of the setting (all methods). The lag of stale "
           "settings is part of the mismatch: the batch comes from an older policy.", "",
           _table(["setting"] + keys,
                  [[s] + [mean_ci(r.step_mean(key) for m in runs.methods(s) for r in runs.by[(s, m)].values())
                          .fmt(digits=4) for key in keys] for s in runs.settings()]), ""]

    main = runs.settings()[0] if runs.settings() else None
    md += ["## Tokens beyond the trust region and with corrective (negative) weight", "",
           "Token-weighted means over the steps of each run (beyond = |pi - mu| > 0.15 for every method), "
           "then mean and interval over seeds.", "",
           _table(["setting", "method"] + list(TRUST),
                  [[s, labels.get(m, m)] + [_pooled(runs.by[(s, m)], f"obj/{k}").fmt(digits=4) for k in TRUST]
                   for s in runs.settings() for m in runs.methods(s)]), ""]
    if main is not None:
        md += [f"By behaviour probability mu, setting `{main}`:", "",
               _table(["method", "bucket"] + list(BUCKET_COLS),
                      [[labels.get(m, m), b] + [_pooled(runs.by[(main, m)], f"obj/{b}/{k}").fmt(digits=4)
                                                for k in BUCKET_COLS]
                       for m in runs.methods(main) for b in BUCKETS]), ""]

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

    ended = {r.slug for r in done}
    md += ["## Grid", ""] + [f"* `{b['name']}` ({sum(s in ended for s in b['runs'])} of {len(b['runs'])} runs ended; "
                             f"settings {', '.join(b['settings'])}; methods {', '.join(b['methods'])}): {b['claims']}"
                             for b in manifest["blocks"]]
    if pending:
        md += ["", "Runs not ended (left out): " + ", ".join(f"`{p}`" for p in pending)]
    notes = Path(out) / "NOTES.md"  # what the person who ran the grid has to say (e.g. why runs were left out)
    if notes.is_file():
        md += ["", "## Notes on this run of the grid", "", notes.read_text().strip()]
    path = report_dir / "README.md"
    path.write_text("\n".join(md) + "\n")
    return path
