"""drpo.models: the built-in tokenizer, the tiny Qwen3 model and its cached warm start."""
from drpo.models.tiny import build_tiny_model, tiny_qwen3_config
from drpo.models.tokenizer import build_tokenizer
from drpo.models.warmstart import WarmStartHParams, default_cache_dir, warm_start

__all__ = ["build_tokenizer", "tiny_qwen3_config", "build_tiny_model", "warm_start",
           "WarmStartHParams", "default_cache_dir"]
