"""Loading the policy: a built-in tiny model, a local folder, or a hub id.

``builtin`` (dense Qwen3) and ``builtin-moe`` (Qwen3-MoE) are warm-started models shipped with the
package (``drpo/data/models/<name>``, written with ``save_pretrained``; ``warmstart.json`` in each says
how it was made and ``drpo warmstart`` makes it again); from there the code path is the one a hub id or
any local checkpoint takes: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``.

Mistakes get one clear line (:class:`ModelLoadError`): a folder that does not exist, a folder that
is not a ``save_pretrained`` folder, a hub id when the hub cannot be reached (said at once, instead
of minutes of retries).
"""
from __future__ import annotations

import os
import socket
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

BUILTIN_MODELS = ("builtin", "builtin-moe")
HUB_HOST = ("huggingface.co", 443)


class ModelLoadError(ValueError):
    """The model named in the config cannot be loaded; the message says why and what to do."""


def builtin_dir(name: str) -> Path:
    """Where the shipped built-in model ``name`` lives (package data)."""
    return Path(str(resources.files("drpo") / "data" / "models" / name))


def resolve_model(model: str) -> str:
    """The folder of ``model``: a built-in model's shipped folder, else ``model`` itself."""
    if model in BUILTIN_MODELS:
        path = builtin_dir(model)
        if not (path / "model.safetensors").is_file():
            raise ModelLoadError(f"the built-in model {model!r} is missing from this installation ({path}); "
                                 f"make it again with: drpo warmstart --model {model} --out {path}")
        return str(path)
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


def load_policy(model: str):
    """(tokenizer, float32 causal LM) for ``model`` = a built-in name, a folder, or a hub id."""
    check_model_source(model)
    path = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {model!r} (from {path!r}): "
                             f"{str(e).splitlines()[0]}") from None
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model {model!r} (from {path!r}): {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer of {model!r} has no EOS token; responses could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, net


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``, every key accounted for (tied weights may be absent); a mismatch
    is an error naming ``where`` the state came from."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    keys = getattr(model, "_tied_weights_keys", None) or []
    tied = set(keys if not isinstance(keys, dict) else list(keys))
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise ModelLoadError(f"{where} does not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}")


def max_positions(model) -> int | None:
    """The number of positions the model was built for (None when its config does not say)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
