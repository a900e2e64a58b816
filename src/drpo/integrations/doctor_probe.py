"""What a fresh Python process of this environment sees of verl (``drpo doctor verl``'s environment facts): the drpo
losses in verl's registry after verl loaded its plug-ins itself (it logs a failed plug-in import only at DEBUG
level), why they are missing, the first of the trainer's modules that fails to import, and TRL's presence.

Run by path, so that nothing of drpo -- not even the package, which may be the broken part -- is imported before
verl's registry is read (:func:`drpo.integrations.doctor.probe_verl_env`)::

    python -c "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \\
        .../doctor_probe.py MODULE...

It prints one line, ``PROBE`` and a JSON object with :class:`drpo.integrations.doctor.VerlEnv`'s fields; a fact it
could not find is left out (the doctor reads it as unknown).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from typing import Any, Sequence


def plugin_error(registry: dict) -> str | None:
    """Why drpo's losses are not in verl's ``registry`` (None: they are)."""
    if "drpo" in registry:
        return None
    eps = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "drpo"]
    policy = os.getenv("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    if not eps:
        return "no 'drpo' entry point in group 'verl.plugins': drpo is not pip-installed here"
    if policy == "none" or (policy != "auto" and "drpo" not in policy.split(",")):
        return f"VERL_USE_EXTERNAL_PLUGINS={policy!r} excludes the 'drpo' plug-in"
    try:
        eps[0].load()
    except Exception as e:  # noqa: BLE001 -- what the plug-in loader swallowed, named
        return f"loading the 'drpo' plug-in raises {type(e).__name__}: {e}"
    return "the 'drpo' entry point loads, yet verl's import registered nothing"


def trl_value_head() -> bool:
    """Whether TRL has the value-head model verl's FSDP engine imports from it."""
    try:
        from trl.experimental.ppo import AutoModelForCausalLMWithValueHead  # noqa: F401
    except ImportError:
        try:
            from trl import AutoModelForCausalLMWithValueHead  # noqa: F401
        except ImportError:
            return False
    return True


def probe(modules: Sequence[str]) -> dict[str, Any]:
    """The facts (module docstring); ``modules``: those the trainer imports when it starts, tried in order."""
    out: dict[str, Any] = {"transfer_queue": importlib.util.find_spec("transfer_queue") is not None}
    import verl
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    out["verl_version"] = verl.__version__
    out["registered"] = sorted(n for n, f in POLICY_LOSS_REGISTRY.items() if hasattr(f, "drpo_objective"))
    out["plugin_error"] = plugin_error(POLICY_LOSS_REGISTRY)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 -- the first import that fails, named
            out["import_error"] = f"import {module} raises {type(e).__name__}: {e}"
            break
    if importlib.util.find_spec("trl") is not None:
        out["trl_version"] = importlib.metadata.version("trl")
        out["trl_value_head"] = trl_value_head()
    return out


if __name__ == "__main__":
    print("PROBE" + json.dumps(probe(sys.argv[1:])))
