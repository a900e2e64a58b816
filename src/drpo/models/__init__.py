"""drpo.models: the built-in tokenizer, the tiny Qwen3 (dense and MoE) models and their cached warm
starts, loading any causal LM, and the text codec."""
from drpo.models.loading import ModelLoadError, load_policy, resolve_model
from drpo.models.text import TextCodec
from drpo.models.tiny import build_tiny_model, tiny_config, tiny_qwen3_config, tiny_qwen3_moe_config
from drpo.models.tokenizer import build_tokenizer
from drpo.models.warmstart import WarmStartHParams, default_cache_dir, warm_start

__all__ = ["build_tokenizer", "tiny_qwen3_config", "tiny_qwen3_moe_config", "tiny_config", "build_tiny_model",
           "warm_start", "WarmStartHParams", "default_cache_dir", "load_policy", "resolve_model",
           "ModelLoadError", "TextCodec"]
