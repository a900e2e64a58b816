"""drpo.models: the tiny Qwen3 (dense and MoE) architectures, loading any causal LM (the built-in
warm-started ones ship as weights), the text codec, and MoE routing (record, compare, replay).
This is the base layer: it imports nothing of drpo but utils."""
from drpo.models.loading import (
    BUILTIN_MODELS, ModelLoadError, builtin_dir, load_policy, load_state, max_positions, model_from_config, read_weights,
    resolve_model,
)
from drpo.models.packaged import PACKAGED_MODELS, WARM_STARTED_MODELS, cache_dir, warm_started_dir
from drpo.models.moe import RoutingStats, given_routing, is_moe
from drpo.models.text import PromptTooLong, TextCodec
from drpo.models.tiny import build_tiny_model, tiny_config, tiny_qwen3_config, tiny_qwen3_moe_config

__all__ = ["BUILTIN_MODELS", "PACKAGED_MODELS", "WARM_STARTED_MODELS", "cache_dir", "warm_started_dir", "ModelLoadError",
           "builtin_dir", "load_policy", "load_state", "max_positions", "model_from_config", "read_weights",
           "resolve_model", "RoutingStats", "given_routing", "is_moe", "PromptTooLong", "TextCodec",
           "build_tiny_model", "tiny_config", "tiny_qwen3_config", "tiny_qwen3_moe_config"]
