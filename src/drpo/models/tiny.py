"""Tiny Qwen3-architecture causal LMs, small enough to train on a laptop CPU in minutes:
a dense Qwen3 and a Qwen3-MoE (the architecture of the DRPO paper's main models, Qwen3-30B-A3B)."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from drpo.models.moe import EXPERTS_IMPLEMENTATION

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

# 8 experts, top-2 routing, every layer sparse; each expert's MLP is a quarter of the dense model's,
# so the active parameters per token (2 x 96) are about half the dense MLP's 384
TINY_MOE_DEFAULTS: dict = {
    **{k: v for k, v in TINY_DEFAULTS.items() if k != "intermediate_size"},
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 96,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "router_aux_loss_coef": 0.01,
}

ARCHS = ("dense", "moe")


def tiny_qwen3_config(vocab_size: int, **overrides) -> Qwen3Config:
    """A Qwen3 config with :data:`TINY_DEFAULTS` (about 0.7M parameters + embeddings)."""
    return Qwen3Config(vocab_size=vocab_size, **{**TINY_DEFAULTS, **overrides})


def tiny_qwen3_moe_config(vocab_size: int, **overrides) -> Qwen3MoeConfig:
    """A Qwen3-MoE config with :data:`TINY_MOE_DEFAULTS` (8 experts, top-2), whose experts run
    transformers' :data:`drpo.models.moe.EXPERTS_IMPLEMENTATION` (``grouped_mm``; why: see
    :mod:`drpo.models.moe`). That setting is not written to config.json by ``save_pretrained`` (nor
    part of ``to_dict``, so the warm start's cache key does not see it): a loaded model gets it from
    :func:`drpo.models.loading.load_policy`."""
    return Qwen3MoeConfig(vocab_size=vocab_size,
                          **{**TINY_MOE_DEFAULTS, "experts_implementation": EXPERTS_IMPLEMENTATION, **overrides})


def tiny_config(arch: str, vocab_size: int, **overrides) -> PretrainedConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {list(ARCHS)}")
    return (tiny_qwen3_config if arch == "dense" else tiny_qwen3_moe_config)(vocab_size, **overrides)


def build_tiny_model(config: PretrainedConfig, seed: int = 0):
    """A freshly initialised model of ``config`` (dense or MoE); the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    cls = Qwen3MoeForCausalLM if isinstance(config, Qwen3MoeConfig) else Qwen3ForCausalLM
    return cls(config)
