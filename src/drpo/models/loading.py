"""Loading the policy: a built-in warm-started tiny model, a local folder, or a hub id.

``builtin`` (dense Qwen3) and ``builtin-moe`` (Qwen3-MoE) resolve to their cached warm starts
(:func:`drpo.models.warmstart.warm_start`), folders written with ``save_pretrained``; from there the
code path is the one a hub id or any local checkpoint takes: ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained``.

Mistakes get one clear line (:class:`ModelLoadError`): a folder that does not exist, a folder that
is not a ``save_pretrained`` folder, a hub id when the hub cannot be reached (said at once, instead
of minutes of retries).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpo.models.moe import use_library_experts_

BUILTIN_MODELS = {"builtin": "dense", "builtin-moe": "moe"}
WARM_START_SEED = 0  # one shared starting point; run seeds vary the RL, not the warm start
HUB_HOST = ("huggingface.co", 443)


class ModelLoadError(ValueError):
    """The model named in the config cannot be loaded; the message says why and what to do."""


def resolve_model(model: str, progress: bool = True) -> str:
    """The folder of ``model``: the cached warm start of a built-in model, else ``model`` itself."""
    if model in BUILTIN_MODELS:
        from drpo.models.warmstart import warm_start

        return str(warm_start(seed=WARM_START_SEED, progress=progress, arch=BUILTIN_MODELS[model]))
    return model


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith(("/", os.sep)) or model.count("/") > 1


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when the Hugging Face hub cannot be reached: offline mode, or no connection within
    ``timeout_s`` (a machine without network fails the DNS look-up at once)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_model_source(model: str) -> None:
    """Fail fast, in one line, when ``model`` can obviously not be loaded."""
    if model in BUILTIN_MODELS:
        return
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model folder {model!r} has no config.json: pass a folder written by "
                                 "save_pretrained (a checkpoint of `drpo train`, or a downloaded model)")
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelLoadError(f"model folder {model!r} has no tokenizer (tokenizer.json / "
                                 "tokenizer_config.json): save the tokenizer with save_pretrained too")
        return
    if p.exists():
        raise ModelLoadError(f"--model {model!r} is a file; pass the folder that holds config.json")
    if _looks_like_path(model):
        raise ModelLoadError(f"model folder not found: {model!r}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return  # already in the local hub cache
    if not hub_reachable():
        raise ModelLoadError(
            f"model {model!r} is neither a local folder nor in the local hub cache, and the Hugging Face "
            "hub cannot be reached (offline); download it elsewhere and pass its folder with --model PATH")


def load_policy(model: str, *, progress: bool = True):
    """(tokenizer, float32 causal LM) for ``model`` = a built-in name, a folder, or a hub id."""
    check_model_source(model)
    path = resolve_model(model, progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {model!r} (from {path!r}): "
                             f"{str(e).splitlines()[0]}") from None
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model {model!r} (from {path!r}): {str(e).splitlines()[0]}") from None
    use_library_experts_(net)  # MoE: transformers' grouped experts (drpo.models.moe); dense: no-op
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer of {model!r} has no EOS token; responses could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, net


def max_positions(model) -> int | None:
    """The number of positions the model was built for (None when its config does not say)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
