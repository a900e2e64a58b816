"""What may change when a run is resumed (``--resume``): the configuration must be the checkpoint's except for
:data:`RESUME_SAFE_KEYS`, which change what is logged or when, not what is computed. ``train.steps`` may grow, unless
the learning-rate schedule is laid out over it (``train.schedule=cosine``: :data:`drpo.training.optim.OVER_THE_RUN`):
then the resumed run's learning rates would not be the uninterrupted run's."""
from __future__ import annotations

from typing import Any

from drpo.training.config import with_legacy_defaults
from drpo.training.optim import OVER_THE_RUN
from drpo.utils.errors import UserError


class ResumeRefused(UserError, ValueError):
    """``--resume`` with a configuration that would not continue the run (the message names the keys)."""


# (task.reward_timeout only bounds how long a reward call may take: a run that finished is unchanged by it)
RESUME_SAFE_KEYS = ("train.steps", "eval.", "save_every", "progress", "tensorboard", "out", "task.reward_timeout")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "params" and not (prefix == "train." and k == "rollout_correction"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict[str, Any], wanted: dict[str, Any], resumed_step: int) -> None:
    """Refuse (:class:`ResumeRefused`, one line) to resume with a configuration that differs from the saved one,
    except for :data:`RESUME_SAFE_KEYS`; ``train.steps`` may only grow, never below the resumed step, and not at all
    when the schedule is laid out over it."""
    # a configuration without a key added later computes as its legacy value (a run made before the key existed)
    a, b = _flatten(with_legacy_defaults(saved)), _flatten(with_legacy_defaults(wanted))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                     and not any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE_KEYS))
    if changed:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
        raise ResumeRefused(f"--resume with a changed configuration ({detail}); only "
                           f"{', '.join(s.rstrip('.') + ('.*' if s.endswith('.') else '') for s in RESUME_SAFE_KEYS)} "
                           "may change. Start a new run (another --out) to change the others")
    steps_saved, steps_new = a.get("train.steps"), b.get("train.steps")
    schedule = a.get("train.schedule")
    if steps_new != steps_saved and schedule in OVER_THE_RUN:
        raise ResumeRefused(f"--resume with train.steps={steps_new} (the run's: {steps_saved}): train.schedule={schedule} "
                            "lays its learning rates out over train.steps, so they would no longer be the run's; "
                            "resume with the same train.steps, or start a new run (another --out)")
    if steps_new is not None and steps_saved is not None and steps_new < steps_saved:
        raise ResumeRefused(f"--resume with train.steps={steps_new} below the run's {steps_saved}: train.steps may only "
                            "grow")
    if steps_new is not None and steps_new < resumed_step:
        raise ResumeRefused(f"--resume: train.steps={steps_new} is below the checkpoint's step {resumed_step}")
