"""A tiny Qwen3-architecture causal LM, small enough to train on a laptop CPU in minutes."""
from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

TINY_DEFAULTS: dict = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 384,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


def tiny_qwen3_config(vocab_size: int, **overrides) -> Qwen3Config:
    """A Qwen3 config with :data:`TINY_DEFAULTS` (about 0.7M parameters + embeddings)."""
    return Qwen3Config(vocab_size=vocab_size, **{**TINY_DEFAULTS, **overrides})


def build_tiny_model(config: Qwen3Config, seed: int = 0) -> Qwen3ForCausalLM:
    """A freshly initialised model; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)
