"""Loading the policy: the built-in warm-started tiny model, a local folder, or a hub id.

``builtin`` resolves to the cached warm start (:func:`drpo.models.warmstart.warm_start`), a folder
written with ``save_pretrained``; from there the code path is the one a hub id or any local
checkpoint takes: ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

BUILTIN = "builtin"
WARM_START_SEED = 0  # one shared starting point; run seeds vary the RL, not the warm start


def resolve_model(model: str, progress: bool = True) -> str:
    if model == BUILTIN:
        from drpo.models.warmstart import warm_start

        return str(warm_start(seed=WARM_START_SEED, progress=progress))
    return model


def load_policy(model: str, *, seed: int = 0, progress: bool = True):
    """(tokenizer, float32 causal LM) for ``model`` = 'builtin', a folder, or a hub id."""
    path = resolve_model(model, progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise OSError(f"could not load model {model!r} (resolved to {path!r}): {e}") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {model!r} has no EOS token; responses could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, net
