"""The comparison report: the stability map, then the verdicts per regime, tables and figures -- all
computed from the runs' metrics by rules fixed before the grids ran (:mod:`drpo.experiments.results`,
:mod:`drpo.experiments.claims`, :mod:`drpo.experiments.selection`, :mod:`drpo.training.collapse`).

:func:`write_report` writes ``README.md`` section by section; each ``section_*`` function returns its
Markdown lines (and draws its figure), so a section can be read, tested or left out on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from scipy.stats import norm

from drpo.experiments import claims as C
from drpo.experiments import effects as E
from drpo.experiments import results as R
from drpo.experiments import stats as S
from drpo.experiments.results import RunResult, Runs
from drpo.experiments.study import Cell
from drpo.objectives.metrics import BUCKET_NAMES, MISMATCH_KEYS
from drpo.training import collapse as collapse_rules

BUCKETS = BUCKET_NAMES
TRUST = ("beyond_pos_frac", "beyond_neg_frac", "neg_weight_frac", "inactive_frac")
BUCKET_COLS = ("token_frac", "beyond_frac", "neg_weight_frac", "inactive_frac")


# ---------------------------------------------------------------------------- figures and tables
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path) -> Path:
    """A one-axis figure's grid and legend, written to ``path``."""
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; a "|" inside a cell (the claim "|A| weighting") is escaped, not a column break."""
    def cells(r: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"

    lines = [cells(header), "|" + "---|" * len(header)]
    lines += [cells(r) for r in rows]
    return "\n".join(lines)


def _pooled(runs: dict[int, RunResult], key: str) -> S.Estimate:
    return S.bounded_mean_ci([r.step_mean(key) for r in runs.values()])


@dataclass
class Curve:
    """A metric over steps for the runs of one method: ``values`` has one row per run, each run's latest logged
    value at every step (NaN before its first); a run that stopped early (collapse) carries its last value
    forward, so the mean at a late step is over every run, not over the survivors alone."""

    steps: np.ndarray
    values: np.ndarray
    stopped: list[Optional[tuple[int, float]]]  # per run: (step, value) where it stopped early, or None

    @property
    def mean(self) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.nanmean(self.values, axis=0)


def carried_curve(runs: dict[int, RunResult], key: str, horizon: int = 0) -> Curve:
    """The curve of ``key`` over steps, carried to ``horizon`` (the step budget) for runs that stopped early."""
    series = [[(s, v) for s, v in r.series(key) if math.isfinite(v)] for r in runs.values()]
    steps = {s for ser in series for s, _ in ser}
    if steps and any(r.state != "finished" for r in runs.values()) and horizon > max(steps):
        steps.add(horizon)
    steps = np.array(sorted(steps), dtype=float)
    values = np.full((len(series), len(steps)), np.nan)
    stopped: list[Optional[tuple[int, float]]] = []
    for i, (ser, r) in enumerate(zip(series, runs.values())):
        if not ser:
            stopped.append(None)
            continue
        at, vals = np.array([s for s, _ in ser], dtype=float), np.array([v for _, v in ser])
        idx = np.searchsorted(at, steps, side="right") - 1  # the latest logged value at or before each step
        values[i] = np.where(idx >= 0, vals[np.clip(idx, 0, None)], np.nan)
        stopped.append((int(at[-1]), float(vals[-1])) if r.state != "finished" else None)  # stopped before its budget
    return Curve(steps, values, stopped)


CURVE_NOTE = ("mean over seeds (bold); thin lines: single seeds; a run stopped for collapse keeps its last value in "
              "later steps (x: where it stopped)")


def _draw(ax, curve: Curve, label: str, marker: Optional[str] = None, ls: str = "-"):
    line, = ax.plot(curve.steps, curve.mean, marker=marker, ms=3, ls=ls, lw=1.8, label=label)
    for row, stop in zip(curve.values, curve.stopped):
        ax.plot(curve.steps, row, color=line.get_color(), lw=0.6, alpha=0.3)
        if stop is not None:
            ax.plot([stop[0]], [stop[1]], marker="x", color=line.get_color(), ms=5, alpha=0.8)
    return line


@dataclass
class Context:
    """What every section needs: the runs, their labels, and the command that rebuilds the report."""

    manifest: dict
    done: list[RunResult]
    pending: list[str]
    runs: Runs
    report_dir: Path
    made_by: str

    def label(self, method: str) -> str:
        return self.manifest.get("methods", {}).get(method, {}).get("label", method)

    def slabel(self, setting: str) -> str:
        return self.manifest.get("settings", {}).get(setting, {}).get("label", setting)


# ---------------------------------------------------------------------------- the stability map
Row = tuple[int, str]  # a map row: (staleness, rollout precision)


def map_layout(settings: dict) -> tuple[list[float], list[Row]]:
    """The map's axes from the manifest's settings: the learning rates (columns) and the rows (staleness at
    FP8, then the 4-bit rollout)."""
    cells = [Cell(s["lr"], s["staleness"], s["precision"]) for s in settings.values() if s.get("lr") is not None]
    lrs = sorted({c.lr for c in cells})
    rows = sorted({c.row for c in cells}, key=lambda r: (r[1] != "fp8", r[0]))
    return lrs, rows


def _row_label(row: Row) -> str:
    n, precision = row
    return f"{precision.upper()}, staleness {n}" if precision != "fp8" else f"staleness {n}"


def plot_map(runs: Runs, methods: list[str], lrs: list[float], rows: list[Row], labels: Callable[[str], str],
             path: Path) -> Path:
    """Per method, two heatmaps side by side: collapse rate and mean final accuracy per cell."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(methods), figsize=(2.7 * len(methods) + 1, 6.2), constrained_layout=True,
                             squeeze=False)
    ims: dict[int, Any] = {}
    for j, m in enumerate(methods):
        for i, (what, cmap, vmax) in enumerate((("collapse rate", "Reds", 1.0), ("final accuracy", "viridis", None))):
            grid = np.full((len(rows), len(lrs)), np.nan)
            text = [["" for _ in lrs] for _ in rows]
            for a, row in enumerate(rows):
                for b, lr in enumerate(lrs):
                    rr = list(runs.by.get((Cell(lr, *row).name, m), {}).values())
                    if not rr:
                        continue
                    if i == 0:
                        k = sum(r.collapsed for r in rr)
                        grid[a, b], text[a][b] = k / len(rr), f"{k}/{len(rr)}"
                    else:
                        v = [r.final_acc for r in rr if r.final_acc is not None]
                        if v:
                            grid[a, b], text[a][b] = float(np.mean(v)), f"{np.mean(v):.2f}"
            ax = axes[i, j]
            ims[i] = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=vmax if vmax else 0.8, aspect="auto")
            for a in range(len(rows)):
                for b in range(len(lrs)):
                    dark = np.isfinite(grid[a, b]) and (grid[a, b] > 0.6 if i == 0 else grid[a, b] < 0.4)
                    ax.text(b, a, text[a][b], ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
            ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7)
            ax.set_yticks(range(len(rows)), [_row_label(r) for r in rows] if j == 0 else [], fontsize=7)
            ax.set_title(f"{labels(m)}\n{what}", fontsize=8)
            if i == 1:
                ax.set_xlabel("learning rate", fontsize=7)
    for i, label in enumerate(("share of seeds collapsed", "mean final accuracy")):  # one scale per row
        fig.colorbar(ims[i], ax=list(axes[i]), shrink=0.8, label=label)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section_map(map_ctx: Context, stage2_notes: list[str]) -> list[str]:
    """The stability map (stage 1): heatmaps and the table, per method and cell; ``stage2_notes``: what the
    stage-2 rule saw and chose (the stage-2 grid's notes; none for a report of the map alone)."""
    runs, settings = map_ctx.runs, map_ctx.manifest.get("settings", {})
    lrs, rows = map_layout(settings)
    methods = list(dict.fromkeys(m for b in map_ctx.manifest["blocks"] for m in b["methods"]))
    fig = plot_map(runs, methods, lrs, rows, map_ctx.label, map_ctx.report_dir / "stability_map.png")
    out = ["## The stability map (stage 1)", "",
           f"{len(map_ctx.done)} runs ended, {len(map_ctx.pending)} not. Per method and cell: how many seeds "
           "collapsed (top row; red = all) and the mean final accuracy (bottom row; a diverged run counts 0, a run "
           "stopped for collapse keeps the accuracy it had). Cells: learning rate (columns) x staleness at the FP8 "
           "rollout, and the 4-bit (NVFP4) rollout (last row). Collapse: see *Definitions*.", "",
           f"![stability map]({fig.name})", "", f"*The stability map. {map_ctx.made_by}*", ""]
    table = []
    for row in rows:
        for lr in lrs:
            name = Cell(lr, *row).name
            cells = []
            for m in methods:
                rr = list(runs.by.get((name, m), {}).values())
                if not rr:
                    cells.append("-")
                    continue
                k = sum(r.collapsed for r in rr)
                began = ",".join(str(r.collapse.began) for r in rr if r.collapsed)
                rec = sum(r.collapse.recovered for r in rr)
                acc = [r.final_acc for r in rr if r.final_acc is not None]
                cells.append(f"{k}/{len(rr)}" + (f" (step {began}" + (f"; {rec} recovered" if rec else "") + ")" if k else "")
                             + (f"; {np.mean(acc):.2f}" if acc else ""))
            table.append([f"lr {lr:g}, {_row_label(row)}"] + cells)
    out += ["Collapsed seeds / seeds (the step each collapse began; how many recovered); mean final accuracy:", "",
            _table(["cell"] + [map_ctx.label(m) for m in methods], table), ""]
    if stage2_notes:
        out += ["### Stage 2's cells, by the rule fixed before the map ran", "", "```",
                _module_doc("drpo.experiments.selection"), "```", ""] + [f"* {n}" for n in stage2_notes] + [""]
    return out


def _module_doc(name: str) -> str:
    import importlib

    return (importlib.import_module(name).__doc__ or "").strip()


# ---------------------------------------------------------------------------- stage-2 sections
def _verdict_rows(vs: list[E.Verdict], label: Callable[[str], str]) -> list[list[str]]:
    rows = []
    for v in vs:
        c = v.claim
        pct = c.metric in C.PCT_METRICS

        def side(names):
            return " + ".join(f"the best of {', '.join(label(m) for m in n[5:].split(','))}"
                              if n.startswith("best:") else label(n) for n in names)

        claimed = ("alike (margin " + (f"{100 * c.margin:.0f}%" if pct else f"{c.margin:.2f}") + ")"
                   if c.rule == "equivalence" else
                   f"within {c.margin:.2f} (non-inferior)" if c.rule == "noninferior" else
                   "fewer collapses" if c.rule == "fewer" else
                   "> 0" if c.magnitude is None else (f"{100 * c.magnitude:+.0f}%" if pct else f"{c.magnitude:+.2f}"))
        mde = ("not detectable" if v.effect.mde == math.inf else "-" if not math.isfinite(v.effect.mde)
               else f"{100 * v.effect.mde:.1f}%" if pct else f"{v.effect.mde:.3f}")
        effect = v.effect.fmt(pct=pct)
        if c.rule == "fewer" and v.effect.n:
            effect += f"; p(fewer) = {v.effect.p_less:.3f}"
        control = side(c.control) + (f" (in {c.control_setting})" if c.control_setting else "")
        rows.append([c.label, c.text, f"{side(c.treatment)} vs {control}; {c.metric}; {v.scope}"
                     + (f" ({v.detail})" if v.detail else ""), claimed, effect, mde, f"**{v.verdict}**"])
    return rows


def section_verdicts(ctx: Context) -> list[str]:
    vs = E.verdicts(ctx.runs, _claims(ctx))
    regimes = list(dict.fromkeys(v.claim.regime for v in vs))
    sequential = ctx.manifest.get("kind") == "sequential"
    out = ["## Verdicts, per regime" + (" (nominal)" if sequential else " (stage 2)"), ""]
    if sequential:
        out += ["The fixed-sample rules of stage 2 applied once to all the runs here, for reference: they are not "
                "adjusted for the plan's looks, so the decisions above (the sequential plan's) are the ones that "
                "count.", ""]
    out += [
           "Effects are paired differences (treatment minus control, same seed and setting) with 95% t-intervals; "
           "accuracy in fractions (0.03 = 3 points), variance and time as relative reductions; collapse as the "
           "reduction of the collapse rate (control minus treatment) with a 95% Newcombe interval and a one-sided "
           "Fisher exact test. MDE = the smallest effect these runs detect with 80% power at the observed spread: "
           "an inconclusive verdict rules out effects larger than about the MDE.", ""]
    for regime in regimes:
        sub = [v for v in vs if v.claim.regime == regime]
        out += [f"### {regime or 'other'}" + (f" ({sub[0].scope})" if regime else ""), "",
                _table(["claim", "text", "comparison (metric; settings)", "claimed", "effect: mean [95% CI]",
                        "MDE (80%)", "verdict"], _verdict_rows(sub, ctx.label)), ""]
    return out + ["### Rules (fixed before the grids ran)", "", "```", (C.__doc__ or "").strip(), "```", ""]


def section_definitions() -> list[str]:
    return ["## Definitions", "",
            f"* **final accuracy**: mean held-out `eval/accuracy` of the last {R.FINAL_EVALS} evaluations; "
            "a diverged (NaN) run counts as 0; a run stopped for collapse keeps the accuracy it had.",
            "* **best accuracy**: the highest held-out accuracy a run logged.",
            "* **collapse** (the trainer's and the report's, `drpo.training.collapse`):", "", "```",
            (collapse_rules.__doc__ or "").strip(), "```", "",
            "* **gradient-norm variance**: variance over steps of `train/grad_norm` (before clipping) within a run.",
            f"* **time to accuracy**: the first evaluation step at which a run reaches the setting's target, step-0 "
            f"accuracy + {C.TIME_FRACTION:g} x (best method's mean final accuracy - step-0 accuracy); never: "
            "last step + one evaluation interval (censored).",
            "* intervals of a mean over seeds (tables) are 95% percentile bootstrap intervals, shown as `mean "
            "[lo, hi]`: they stay within the values' range (an accuracy's within [0, 1]); paired effects of the "
            "verdicts use Student-t intervals.", ""]


def section_settings(ctx: Context) -> list[str]:
    """Accuracy, collapses and time to accuracy, per setting and method."""
    out = ["## Accuracy, collapses and time to accuracy", ""]
    for s in ctx.runs.settings():
        target = E.time_target(ctx.runs, s)
        out += [f"### {ctx.slabel(s)} (`{s}`)", "",
                f"Target for time to accuracy: {target:.3f}." if target is not None else "", ""]
        rows = []
        for m in ctx.runs.methods(s):
            rr = ctx.runs.by[(s, m)]
            steps = [r.steps_to(target, r.last_step + r.eval_every) for r in rr.values()] if target is not None else []
            censored = sum(st > r.last_step for st, r in zip(steps, rr.values()))
            rows.append([ctx.label(m), str(len(rr)), S.bounded_mean_ci(r.initial_acc for r in rr.values()).fmt(),
                         S.bounded_mean_ci(r.final_acc for r in rr.values()).fmt(),
                         S.bounded_mean_ci(r.best_acc for r in rr.values()).fmt(),
                         f"{sum(r.collapsed for r in rr.values())}/{len(rr)}",
                         f"{sum(r.collapse.recovered for r in rr.values())}",
                         f"{sum(r.diverged for r in rr.values())}/{len(rr)}",
                         (S.bounded_mean_ci(steps).fmt(digits=0) + (f", {censored} censored" if censored else ""))
                         if steps else "-"])
        out += [_table(["method", "seeds", "step-0 acc", "final acc", "best acc", "collapsed", "recovered",
                        "diverged", "steps to target"], rows), ""]
    return out


def plot_curves(runs: Runs, setting: str, methods: list[str], label: Callable[[str], str], path: Path,
                horizon: int = 0) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    for ax, key, title in ((axes[0], "eval/accuracy", "held-out accuracy"), (axes[1], "reward/mean", "train reward"),
                           (axes[2], "response/eos_frac", "responses ending with EOS")):
        for i, m in enumerate(methods):
            curve = carried_curve(runs.by.get((setting, m), {}), key, horizon)
            if curve.steps.size:
                _draw(ax, curve, label(m), marker="o" if key == "eval/accuracy" else None, ls=("-", "--")[i // 10 % 2])
        ax.set(title=f"{title} ({setting})", xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
    fig.suptitle(CURVE_NOTE, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_delta(runs: Runs, settings: list[str], path: Path) -> Optional[Path]:
    """The adaptive delta (obj/delta) over steps, mean over seeds, one line per setting."""
    if not any(runs.by.get((s, "drpo_auto")) for s in settings):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for s in settings:
        curve = carried_curve(runs.by.get((s, "drpo_auto"), {}), "obj/delta")
        if curve.steps.size:
            _draw(ax, curve, s)
    ax.set(yscale="log", xlabel="step", ylabel="delta", title="adaptive delta\n" + CURVE_NOTE)
    ax.title.set_fontsize(8)
    return _finish(plt, fig, ax, path)


def section_curves(ctx: Context) -> list[str]:
    out = ["## Curves", ""]
    for s in ctx.runs.settings():
        fig = plot_curves(ctx.runs, s, ctx.runs.methods(s), ctx.label, ctx.report_dir / f"curves_{s}.png", _budget(ctx))
        out += [f"![curves {s}]({fig.name})", "",
                f"*{ctx.slabel(s)}: held-out accuracy, train reward and the share of responses that end; {CURVE_NOTE}. "
                f"{ctx.made_by}*", ""]
    fig = plot_delta(ctx.runs, ctx.runs.settings(), ctx.report_dir / "adaptive_delta.png")
    if fig is not None:
        out += ["### The adaptive delta", "", f"![adaptive delta]({fig.name})", "",
                f"*obj/delta of DRPO (adaptive delta) per setting. {ctx.made_by}*", ""]
    return out


def section_grad_norm(ctx: Context) -> list[str]:
    runs = ctx.runs
    return ["## Gradient-norm variance", "",
            _table(["setting", "method", "var(grad_norm) over steps", "mean grad_norm"],
                   [[s, ctx.label(m), S.mean_ci(r.grad_var for r in runs.by[(s, m)].values()).fmt(digits=4),
                     _pooled(runs.by[(s, m)], "train/grad_norm").fmt()]
                    for s in runs.settings() for m in runs.methods(s)]), ""]


def section_mismatch(ctx: Context) -> list[str]:
    runs = ctx.runs
    keys = [k for k in [f"mismatch/{k}" for k in MISMATCH_KEYS] + ["rollout/router_flip_frac"]
            if any(k in row for r in ctx.done for row in r.rows)]  # the columns these runs logged
    return ["## Rollout mismatch (rollout engine vs trainer, first minibatch of each step)", "",
            "Mean over steps of each run, then over the runs of the setting (all methods). The lag of stale "
            "settings is part of the mismatch: the batch comes from an older policy.", "",
            _table(["setting"] + keys,
                   [[s] + [S.mean_ci(r.step_mean(key) for m in runs.methods(s) for r in runs.by[(s, m)].values())
                           .fmt(digits=4) for key in keys] for s in runs.settings()]), ""]


def section_trust_region(ctx: Context) -> list[str]:
    runs = ctx.runs
    out = ["## Tokens beyond the trust region and with corrective (negative) weight", "",
           "Token-weighted means over the steps of each run (beyond = |pi - mu| > 0.15 for every method), "
           "then mean and interval over seeds.", "",
           _table(["setting", "method"] + list(TRUST),
                  [[s, ctx.label(m)] + [_pooled(runs.by[(s, m)], f"obj/{k}").fmt(digits=4) for k in TRUST]
                   for s in runs.settings() for m in runs.methods(s)]), ""]
    main = runs.settings()[0] if runs.settings() else None
    if main is not None:
        out += [f"By behaviour probability mu, setting `{main}`:", "",
                _table(["method", "bucket"] + list(BUCKET_COLS),
                       [[ctx.label(m), b] + [_pooled(runs.by[(main, m)], f"obj/{b}/{k}").fmt(digits=4)
                                              for k in BUCKET_COLS]
                        for m in runs.methods(main) for b in BUCKETS]), ""]
    return out


def plot_ratio_vs_shift(all_runs: list[RunResult], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5), constrained_layout=True)
    for b in BUCKETS:
        xs, ys = [], []
        for r in all_runs:
            for row in r.rows:
                x, y = collapse_rules.as_number(row.get(f"obj/{b}/abs_shift_mean")), \
                    collapse_rules.as_number(row.get(f"obj/{b}/abs_ratio_dev_mean"))
                if x and y and math.isfinite(x) and math.isfinite(y):
                    xs.append(x)
                    ys.append(y)
        if xs:
            ax.scatter(xs, ys, s=6, alpha=0.4, label=f"{b} ({len(xs)} steps)")
    ax.set(xscale="log", yscale="log", xlabel="mean |pi - mu| (probability shift)", ylabel="mean |r - 1| (ratio deviation)",
           title="ratio deviation vs probability shift, per mu bucket")
    return _finish(plt, fig, ax, path)


def section_ratio_proxy(ctx: Context) -> list[str]:
    fig = plot_ratio_vs_shift(ctx.done, ctx.report_dir / "ratio_vs_shift.png")
    shift = {b: S.mean_ci(r.step_mean(f"obj/{b}/abs_shift_mean") for r in ctx.done) for b in BUCKETS}
    dev = {b: S.mean_ci(r.step_mean(f"obj/{b}/abs_ratio_dev_mean") for r in ctx.done) for b in BUCKETS}
    return ["## Is the ratio a good proxy for the probability shift?", "",
            "Each point is one step of one run (all settings and methods): the token-weighted mean \\|r - 1\\| "
            "against the mean \\|pi - mu\\| of the tokens in one behaviour-probability bucket. Were the ratio a "
            "faithful proxy, the buckets would lie on one curve; the paper argues that rare tokens show a far "
            "larger ratio deviation for the same probability shift. The last column is the ratio of the two means.", "",
            _table(["bucket", "mean |pi - mu|", "mean |r - 1|", "|r - 1| / |pi - mu|"],
                   [[b, shift[b].fmt(digits=4), dev[b].fmt(digits=4),
                     f"{dev[b].mean / shift[b].mean:.1f}" if shift[b].n and shift[b].mean > 0 else "-"]
                    for b in BUCKETS]), "",
            f"![ratio vs shift]({fig.name})", "",
            f"*|r - 1| against |pi - mu| per mu bucket, from the runs' rollouts. {ctx.made_by}*", ""]


def section_grid(ctx: Context, out_dir: Path) -> list[str]:
    ended = {r.slug for r in ctx.done}
    lines = ["## Grid", ""] + [f"* `{b['name']}` ({sum(s in ended for s in b['runs'])} of {len(b['runs'])} runs ended; "
                               f"settings {', '.join(b['settings'])}; methods {', '.join(b['methods'])}; seeds "
                               f"{', '.join(map(str, b['seeds']))}): {b['claims']}" for b in ctx.manifest["blocks"]]
    lines += [f"* note: {n}" for n in ctx.manifest.get("notes", [])]
    if ctx.pending:
        lines += ["", "Runs not ended (left out): " + ", ".join(f"`{p}`" for p in ctx.pending)]
    notes = Path(out_dir) / "NOTES.md"  # what the person who ran the grid has to say (e.g. why runs were left out)
    if notes.is_file():
        lines += ["", "## Notes on this run of the grid", "", notes.read_text().strip()]
    return lines


# ---------------------------------------------------------------------------- time to collapse
def _claims(ctx: Context) -> tuple[C.Claim, ...]:
    return tuple(C.Claim.from_dict(d, "grid.json") for d in ctx.manifest.get("claims", []))


def _budget(ctx: Context) -> int:
    """The runs' step budget (train.steps of the grid's base), the horizon of the survival curves."""
    steps = [int(o.split("=", 1)[1]) for o in ctx.manifest.get("base", []) if o.startswith("train.steps=")]
    return steps[-1] if steps else max((r.last_step for r in ctx.done), default=0)


def _regime_of(ctx: Context) -> dict[str, str]:
    """setting -> the regime the claims put it in (calm, stressed), when they do."""
    return {st: c.regime for c in _claims(ctx) if c.regime for st in c.settings}


def plot_km(ctx: Context, path: Path) -> Path:
    """Kaplan-Meier curves of the time to collapse: one panel per setting, one line per method."""
    plt = _plt()
    settings, horizon, regime = ctx.runs.settings(), _budget(ctx), _regime_of(ctx)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings) + 1, 4.2), constrained_layout=True,
                             squeeze=False)
    for ax, st in zip(axes[0], settings):
        for m in ctx.runs.methods(st):
            d, e = E.survival(list(ctx.runs.by[(st, m)].values()))
            km = S.kaplan_meier(d, e, horizon)
            x = np.concatenate([[0.0], km.times, [horizon]])
            y = np.concatenate([[1.0], km.surv, [km.surv[-1] if km.surv.size else 1.0]])
            line, = ax.step(x, y, where="post", lw=1.6, label=f"{ctx.label(m)} ({km.events}/{km.n})")
            cens = [t for t, ev in zip(d, e) if not ev]
            if cens:  # a censored run: a tick on the curve at its last step
                at = [y[np.searchsorted(x, t, side="right") - 1] for t in cens]
                ax.plot(cens, at, ls="", marker="|", ms=9, color=line.get_color())
        ax.set(xlim=(0, horizon), ylim=(-0.03, 1.03), xlabel="step", ylabel="share of runs not collapsed",
               title=f"{regime.get(st, '')} {st}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (collapsed/runs)", title_fontsize=7)
    fig.suptitle("time to collapse, Kaplan-Meier (| : a run that did not collapse, censored at its last step)",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _median(km: S.Survival) -> str:
    if km.n == 0:
        return "-"
    if math.isnan(km.median):
        return f"not reached (S > 0.5 at step {km.horizon:g})"
    bound = lambda v: "-" if math.isnan(v) else "not reached" if math.isinf(v) else f"{v:.0f}"  # noqa: E731
    return f"{km.median:.0f} [{bound(km.median_lo)}, {bound(km.median_hi)}]"


def _logrank_of(ctx: Context, claim: C.Claim, scope: tuple[str, ...]) -> tuple[float, float, float]:
    t, c = E.side_runs(ctx.runs, scope, claim.treatment), E.side_runs(ctx.runs, scope, claim.control)
    (d1, e1), (d2, e2) = E.survival(t), E.survival(c)
    return S.logrank(d1, e1, d2, e2, _budget(ctx), [r.setting for r in t], [r.setting for r in c])


def section_survival(ctx: Context) -> list[str]:
    """Collapse as time-to-event: Kaplan-Meier curves, medians, and the log-rank beside the exact tests."""
    horizon = _budget(ctx)
    fig = plot_km(ctx, ctx.report_dir / "time_to_collapse.png")
    out = ["## Time to collapse", "",
           f"Each run's collapse step is a survival time; a run that did not collapse is censored at its last step "
           f"(it is not 'never': it was stopped at the budget of {horizon} steps). Kaplan-Meier estimates "
           "(statsmodels `SurvfuncRight`), the median time to collapse with its 95% interval (Brookmeyer-Crowley, "
           f"complementary log-log), and the restricted mean: the mean number of steps before collapse within "
           f"the {horizon}-step budget (the area under the curve).", "",
           f"![time to collapse]({fig.name})", "", f"*Time to collapse per setting and method. {ctx.made_by}*", ""]
    rows = []
    for st in ctx.runs.settings():
        for m in ctx.runs.methods(st):
            d, e = E.survival(list(ctx.runs.by[(st, m)].values()))
            km = S.kaplan_meier(d, e, horizon)
            rows.append([st, ctx.label(m), str(km.n), str(km.events), _median(km), f"{km.rmst:.1f}"])
    out += [_table(["setting", "method", "runs", "collapsed", "median steps to collapse [95% CI]",
                    f"restricted mean steps (of {horizon})"], rows), ""]
    collapse = [c for c in _claims(ctx) if c.metric == "collapse"]
    if collapse:
        rows = []
        for c in collapse:
            for scope in E.scopes(ctx.runs, c):
                e, _ = E.claim_effect(ctx.runs, c, scope)
                chi2, p, z = _logrank_of(ctx, c, scope)
                rows.append([c.label, c.text, ", ".join(scope), e.detail or "-",
                             f"{e.p_less:.3g}" if e.n else "-", f"**{C.verdict(c, e)}**",
                             f"z = {z:+.2f}, p = {p:.3g}" + (" (stratified by setting)" if len(scope) > 1 else ""),
                             "treatment later" if z > 0 else "treatment earlier" if z < 0 else "-"])
        out += ["### The collapse claims: the exact test on counts and the log-rank test on times", "",
                "The exact test counts collapses (one-sided Fisher, the rule fixed before the grids: 'reproduced' "
                "at p < 0.05); the log-rank test compares the times (two-sided; z > 0: the treatment collapses later "
                "or less). The log-rank p-values are nominal: a grid read once.", "",
                _table(["claim", "text", "settings", "collapsed (treatment vs control)", "Fisher p (fewer)",
                        "verdict (Fisher)", "log-rank", "direction"], rows), ""]
    return out


# ---------------------------------------------------------------------------- aggregates for few runs
def section_robust(ctx: Context) -> list[str]:
    """The interquartile mean of final accuracy and the probability of improvement, stratified bootstrap."""
    regime = _regime_of(ctx)
    groups: dict[str, list[str]] = {}
    for st in ctx.runs.settings():
        groups.setdefault(regime.get(st) or st, []).append(st)
    methods = list(dict.fromkeys(m for st in ctx.runs.settings() for m in ctx.runs.methods(st)))
    rows = []
    for m in methods:
        cells = []
        for sts in groups.values():
            strata = [[r.final_acc for r in ctx.runs.by.get((st, m), {}).values() if r.final_acc is not None]
                      for st in sts]
            cells.append(S.iqm(strata).fmt() if any(strata) else "-")
        rows.append([ctx.label(m)] + cells)
    out = ["## Aggregates for few runs: interquartile mean and probability of improvement", "",
           "After Agarwal et al. (NeurIPS 2021): the interquartile mean (IQM: the mean of the middle half of the "
           "runs) of final accuracy, and the probability of improvement P(treatment > control) + P(tie) / 2 "
           "(control 0.5: no difference), each with a 95% stratified percentile bootstrap interval (runs resampled "
           "within each setting; scipy.stats.bootstrap with one sample per setting, since their `rliable` is "
           "archived and needs arch, seaborn and absl-py for the same computation). Nominal: not adjusted for the "
           "looks of a sequential plan.", "",
           _table(["method"] + [f"IQM final accuracy, {g} ({', '.join(sts)})" if g not in sts else f"IQM final accuracy, {g}"
                                for g, sts in groups.items()], rows), ""]
    rows = []
    for c in _claims(ctx):
        if c.metric != "final_acc":
            continue
        for scope in E.scopes(ctx.runs, c):
            xs, ys = [], []
            for st in scope:
                t, _ = E.side_values(ctx.runs, st, c.treatment, E.final)
                ctl, _ = E.side_values(ctx.runs, c.control_setting or st, c.control, E.final)
                xs.append(list(t.values()))
                ys.append(list(ctl.values()))
            rows.append([c.label, c.text, ", ".join(scope), S.poi(xs, ys).fmt()])
    if rows:
        out += ["Probability of improvement on final accuracy, per claim (the control of a claim with two methods: "
                "their mean per seed):", "",
                _table(["claim", "text", "settings", "P(treatment > control) [95% CI] (runs)"], rows), ""]
    return out


# ---------------------------------------------------------------------------- the sequential plan
def section_sequential(ctx: Context) -> list[str]:
    """The plan (its docstring), its boundaries, each comparison's looks and where it stopped."""
    from drpo.experiments import sequential as Q

    looks = Q.analyse(ctx.runs)
    c_z = Q.bounds()
    rows = [[str(k + 1), str((k + 1) * Q.BLOCK), f"{t:.3f}", f"{c_z[k]:.3f}", f"{2 * norm.sf(c_z[k]):.2g}",
             f"{Q._t_bound(c_z[k], (k + 1) * Q.BLOCK - 1):.2f}"] for k, t in enumerate(Q.fractions())]
    out = ["## The sequential plan and where each comparison stopped", "",
           "The plan, committed before any of its runs (`src/drpo/experiments/sequential.py`):", "", "```",
           (Q.__doc__ or "").strip(), "```", "",
           _table(["look", "seeds per method", "information fraction t", "z boundary c_k", "nominal two-sided p",
                   "t boundary (paired, n - 1 df)"], rows), ""]
    summary, detail = [], []
    by = {c.id: c for c in Q.claims()}
    for cid, ls in looks.items():
        c = by[cid]
        last = ls[-1] if ls else None
        stat = lambda x: (f"z = {x.statistic:+.2f} (bound +-{x.bound:.2f})" if Q.test_of(c) == "log-rank"  # noqa: E731
                          else f"{x.statistic:+.3f}, RCI [{x.lo:+.3f}, {x.hi:+.3f}]")
        summary.append([c.label, c.text, Q.test_of(c), str(last.look) if last else "-", str(last.n) if last else "-",
                        f"**{last.decision}**" if last else "not started", stat(last) if last else "-"])
        for x in ls:
            detail.append([c.label, str(x.look), str(x.n), stat(x), x.detail,
                           "-" if math.isnan(x.power) else f"{x.power:.3f}", x.decision])
    out += ["Where each comparison stopped (the decision of its last look; 'continue': waiting for the next block):",
            "", _table(["claim", "text", "test", "stopped at look", "seeds per method", "decision", "statistic"],
                       summary), "",
            "Every look:", "", _table(["claim", "look", "seeds per method", "statistic", "detail",
                                       "conditional power (futility)", "decision"], detail), ""]
    return out


# ---------------------------------------------------------------------------- the report
def _context(out: Path, report_dir: Path, command: str) -> Context:
    manifest, done, pending = R.load_runs(Path(out))
    return Context(manifest, done, pending, Runs(done), report_dir, f"Made by `{command}`.")


def write_report(out: Path, report_dir: Path, command: str, map_dir: Optional[Path] = None) -> Path:
    """Read the runs of the grid in ``out`` (and, for stage 2, the stability map in ``map_dir``) and write
    ``report_dir/README.md`` with its figures: the map first, then the verdicts per regime, then the rest."""
    report_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(out, report_dir, command)
    is_map = ctx.manifest.get("kind") == "map"
    map_ctx = _context(map_dir, report_dir, command) if map_dir is not None else ctx if is_map else None
    title = (f"# The stability map: grid `{ctx.manifest['name']}`" if is_map else
             f"# Comparison report: grid `{ctx.manifest['name']}`" + (
                 f" (stage 2) and the stability map `{map_ctx.manifest['name']}` (stage 1)" if map_ctx else ""))
    md = [title, "",
          f"{len(ctx.done)} runs ended ({sum(r.diverged for r in ctx.done)} diverged, "
          f"{sum(r.state == 'collapsed' for r in ctx.done)} stopped early for collapse), {len(ctx.pending)} not ended "
          f"(left out). Base overrides: `{' '.join(ctx.manifest['base'])}`. Rebuild with `{command}`.", ""]
    if map_ctx is not None:
        md += section_map(map_ctx, [] if is_map else ctx.manifest.get("notes", []))
    if ctx.manifest.get("kind") == "sequential":
        md += section_sequential(ctx)
    if ctx.manifest.get("claims"):
        md += section_verdicts(ctx)
    if not is_map:  # the map's 2 seeds per cell describe; time-to-collapse and aggregates serve verdicts
        md += section_survival(ctx) + section_robust(ctx)
    md += section_definitions()
    for section in (section_settings, section_curves, section_grad_norm, section_mismatch, section_trust_region,
                    section_ratio_proxy):
        md += section(ctx)
    md += section_grid(ctx, out)
    path = report_dir / "README.md"
    path.write_text("\n".join(md) + "\n")
    return path
