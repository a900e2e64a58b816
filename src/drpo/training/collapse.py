"""Collapse of an RL run, read from the metrics it logs: one definition for the trainer (a warning in
the progress line and the summary, and ``train.stop_on_collapse``) and for the comparison report.

Real LLM RL runs collapse in form as well as in accuracy. A run is *collapsed at step t* when any of:

    nonfinite  the step's loss, gradient norm or mean reward is NaN or inf (the trainer then stops:
               the run diverged)
    accuracy   its latest held-out accuracy is below ACC_FRACTION (0.5) of the best it has had so far,
               step 0 included: below half of where it started, or far below its own best
    no_eos     under EOS_MIN (0.5) of the step's responses ended with EOS (the others ran to
               rollout.max_new_tokens) for EOS_STEPS (5) or more consecutive steps
    entropy    the policy's mean token entropy (``obj/entropy``) is above ENTROPY_FACTOR (4) x its
               value at the run's first step, for ENTROPY_STEPS (5) or more consecutive steps

The collapse *began* at the first collapsed step (for no_eos and entropy: the first step of the
stretch). A run that collapsed *recovered* if it is no longer collapsed at its last step.
*Beyond recovery* (what ``train.stop_on_collapse`` stops, and a grid records as collapsed without
running on): collapsed at every one of the last PATIENCE (20) steps.

The thresholds were fixed before the stability map's runs (``docs/compare``) were made, not tuned on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

ACC_FRACTION = 0.5
EOS_MIN = 0.5
EOS_STEPS = 5
ENTROPY_FACTOR = 4.0
ENTROPY_STEPS = 5
PATIENCE = 20
NONFINITE_KEYS = ("obj/loss", "train/grad_norm", "reward/mean")


def as_number(v: Any) -> Optional[float]:
    """A logged value as a float (NaN/inf are logged as strings); None when absent or not a number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


@dataclass
class CollapseState:
    """Where a run stands. ``began``/``reason``: its first collapse (None: never collapsed);
    ``now``/``now_reason``: collapsed at the last step seen, and why; ``streak``: consecutive collapsed
    steps up to the last one."""

    began: Optional[int] = None
    reason: str = ""
    now: bool = False
    now_reason: str = ""
    streak: int = 0
    last_step: int = 0

    @property
    def collapsed(self) -> bool:
        """Collapsed at some step."""
        return self.began is not None

    @property
    def recovered(self) -> bool:
        return self.collapsed and not self.now

    @property
    def beyond_recovery(self) -> bool:
        return self.now and (self.now_reason.startswith("nonfinite") or self.streak >= PATIENCE)

    def describe(self) -> str:
        if not self.collapsed:
            return "no collapse"
        tail = ("not recovered" if self.now else f"recovered by step {self.last_step}")
        return f"collapsed at step {self.began}: {self.reason} ({tail})"


class CollapseMonitor:
    """Feed it the logged rows in step order (:meth:`update`); :attr:`state` is the verdict so far."""

    def __init__(self) -> None:
        self.state = CollapseState()
        self._best_acc: Optional[float] = None
        self._acc_low = False
        self._acc_text = ""
        self._eos_run: list[int] = []        # steps of the current stretch of low-EOS steps
        self._ent_first: Optional[float] = None
        self._ent_run: list[int] = []
        self._nonfinite: Optional[str] = None

    def update(self, step: int, row: dict[str, Any]) -> CollapseState:
        s = self.state
        s.last_step = step
        for key in NONFINITE_KEYS:
            v = as_number(row.get(key))
            if v is not None and not math.isfinite(v) and self._nonfinite is None:
                self._nonfinite = f"nonfinite ({key} is {v})"
        acc = as_number(row.get("eval/accuracy"))
        if acc is not None and math.isfinite(acc):
            self._best_acc = acc if self._best_acc is None else max(self._best_acc, acc)
            self._acc_low = acc < ACC_FRACTION * self._best_acc
            self._acc_text = (f"held-out accuracy {acc:.3f} is below {ACC_FRACTION:g} x the run's best "
                              f"{self._best_acc:.3f}")
        eos = as_number(row.get("response/eos_frac"))
        if eos is not None:
            self._eos_run = self._eos_run + [step] if eos < EOS_MIN else []
        ent = as_number(row.get("obj/entropy"))
        if ent is not None and math.isfinite(ent):
            if self._ent_first is None:
                self._ent_first = ent
            high = ent > ENTROPY_FACTOR * self._ent_first
            self._ent_run = self._ent_run + [step] if high else []

        found: list[tuple[int, str]] = []  # (the step this signal's collapse began, why)
        if self._nonfinite:
            found.append((step, self._nonfinite))
        if self._acc_low:
            found.append((step, f"accuracy: {self._acc_text}"))
        if len(self._eos_run) >= EOS_STEPS:
            found.append((self._eos_run[0], f"no_eos: under {EOS_MIN:g} of the responses ended with EOS for "
                                            f"{len(self._eos_run)} consecutive steps"))
        if len(self._ent_run) >= ENTROPY_STEPS:
            found.append((self._ent_run[0], f"entropy: above {ENTROPY_FACTOR:g} x its first value "
                                            f"({self._ent_first:.3g}) for {len(self._ent_run)} consecutive steps"))
        if found:
            began, why = min(found)
            if s.began is None:
                s.began, s.reason = began, why
            s.streak = s.streak + 1 if s.now else step - began + 1
            s.now, s.now_reason = True, self._nonfinite or why
        elif step > 0:  # step 0 is the evaluation before training: nothing to judge yet
            s.now, s.now_reason, s.streak = False, "", 0
        return s


def detect_collapse(rows: Iterable[dict[str, Any]], *, diverged: bool = False) -> CollapseState:
    """The collapse verdict of a run from its metrics rows (``metrics.jsonl``). ``diverged``: the run
    stopped on NaN/inf (its status says so), which counts as a collapse at its last step."""
    mon = CollapseMonitor()
    last = 0
    for row in sorted(rows, key=lambda r: r.get("step", 0)):
        last = int(row.get("step", 0))
        mon.update(last, row)
    if diverged and not mon.state.now_reason.startswith("nonfinite"):
        mon.update(last, {"obj/loss": float("nan")})
    return mon.state
