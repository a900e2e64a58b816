"""Pick the rollout engine named in the config: the built-in HF sampler, or vLLM."""
from __future__ import annotations

from torch import nn

from drpo.rollout.engine import HFRolloutEngine
from drpo.training.config import RolloutConfig


def make_engine(cfg: RolloutConfig, model: nn.Module, *, eos_id: int, pad_id: int):
    if cfg.engine == "vllm":
        from drpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, precision=cfg.precision, eos_id=eos_id, pad_id=pad_id)
    return HFRolloutEngine(model, precision=cfg.precision, eos_id=eos_id, pad_id=pad_id,
                           max_batch=cfg.max_batch)
