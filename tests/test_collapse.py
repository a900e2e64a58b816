"""The collapse definition (drpo.training.collapse) on synthetic metric rows: each signal, when the
collapse began, recovery, and 'beyond recovery' (what train.stop_on_collapse stops)."""
from __future__ import annotations

import pytest

from drpo.training import collapse as C
from drpo.training.collapse import CollapseMonitor, detect_collapse


def rows(n: int, *, acc=None, eos=None, entropy=None, loss=None, every: int = 10) -> list[dict]:
    """Steps 0..n: eval/accuracy every ``every`` steps (``acc(step)``), the others per step."""
    out = [{"step": 0, "eval/accuracy": acc(0) if acc else 0.3}]
    for s in range(1, n + 1):
        r = {"step": s, "response/eos_frac": eos(s) if eos else 1.0, "obj/entropy": entropy(s) if entropy else 1.0,
             "obj/loss": loss(s) if loss else 0.1, "train/grad_norm": 0.5, "reward/mean": 0.4}
        if acc and s % every == 0:
            r["eval/accuracy"] = acc(s)
        out.append(r)
    return out


def test_a_healthy_run_never_collapses():
    st = detect_collapse(rows(100, acc=lambda s: 0.3 + 0.004 * s, entropy=lambda s: 1.0 - 0.005 * s))
    assert not st.collapsed and not st.now and st.describe() == "no collapse"


def test_accuracy_below_half_of_its_best():
    # rises to 0.6 at step 30, then falls: 0.29 at step 60 is below half of 0.6
    acc = lambda s: {0: 0.3, 10: 0.4, 20: 0.5, 30: 0.6, 40: 0.45, 50: 0.31, 60: 0.29}.get(s, 0.29)  # noqa: E731
    st = detect_collapse(rows(80, acc=acc))
    assert st.collapsed and st.began == 60 and st.reason.startswith("accuracy")
    assert st.now and st.streak == 21 and st.beyond_recovery  # collapsed at every step 60..80
    # half of the step-0 accuracy counts the same way
    assert detect_collapse(rows(20, acc=lambda s: 0.3 if s == 0 else 0.14)).began == 10


def test_no_eos_for_five_steps_began_at_the_first_of_them_and_recovery():
    eos = lambda s: 0.3 if 12 <= s <= 18 else 1.0  # noqa: E731
    st = detect_collapse(rows(40, eos=eos))
    assert st.began == 12 and st.reason.startswith("no_eos") and st.recovered and not st.beyond_recovery
    assert "recovered by step 40" in st.describe()
    # four low steps are not a collapse
    assert not detect_collapse(rows(40, eos=lambda s: 0.3 if 12 <= s <= 15 else 1.0)).collapsed


def test_entropy_explosion_relative_to_the_first_step():
    st = detect_collapse(rows(30, entropy=lambda s: 1.0 if s < 10 else 4.5))
    assert st.began == 10 and st.reason.startswith("entropy")
    assert not detect_collapse(rows(30, entropy=lambda s: 1.0 if s < 10 else 3.9)).collapsed  # below 4x


def test_nonfinite_is_beyond_recovery_at_once_and_a_diverged_status_counts():
    st = detect_collapse(rows(10, loss=lambda s: float("nan") if s == 7 else 0.1))
    assert st.began == 7 and st.reason.startswith("nonfinite") and st.beyond_recovery and not st.recovered
    st = detect_collapse(rows(10), diverged=True)
    assert st.collapsed and st.beyond_recovery and st.began == 10
    assert C.as_number("nan") != C.as_number("nan") and C.as_number("x") is None and C.as_number(True) is None


def test_beyond_recovery_needs_patience_steps_and_the_monitor_matches_the_function():
    eos = lambda s: 0.0 if s >= 5 else 1.0  # noqa: E731
    mon, states = CollapseMonitor(), []
    for r in rows(40, eos=eos):
        states.append(mon.update(r["step"], r).beyond_recovery)
    first = states.index(True)  # streak counted from the first low step (5): step 5 + PATIENCE - 1
    assert first == 5 + C.PATIENCE - 1
    assert detect_collapse(rows(40, eos=eos)).beyond_recovery


@pytest.mark.parametrize("name,value", [("ACC_FRACTION", 0.5), ("EOS_MIN", 0.5), ("EOS_STEPS", 5),
                                        ("ENTROPY_FACTOR", 4.0), ("PATIENCE", 20)])
def test_the_thresholds_are_the_documented_ones(name, value):
    """The numbers the docstring (and so the report's definition) states are the ones the code uses."""
    assert getattr(C, name) == value and f"{name} ({value:g})" in " ".join((C.__doc__ or "").split())
