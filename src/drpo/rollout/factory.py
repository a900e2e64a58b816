"""Pick the rollout engine named in the config: the built-in HF sampler, or vLLM. Both are an :class:`Engine`."""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
from torch import nn

from drpo.rollout.config import RolloutConfig
from drpo.rollout.engine import EngineUnavailable, HFRolloutEngine, RolloutBatch, SamplingParams


class Engine(Protocol):
    """A rollout engine: its own copy of the policy (at its precision) that samples and returns its log-probs mu.

    sync(model)                      copy ``model``'s weights in
    generate(prompts, p, generator)  samples of token-id ``prompts`` (a :class:`RolloutBatch`)
    close()                          release what it holds (vLLM's engine and memory)
    """

    def sync(self, model: nn.Module) -> None: ...
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> RolloutBatch: ...
    def close(self) -> None: ...


def require_vllm() -> None:
    """Fail in one line when vLLM is not installed here (it lives in its own venv, .venv-vllm)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from drpo.rollout.vllm_engine import MISSING_VLLM

        raise EngineUnavailable(MISSING_VLLM)


def require_engine(engine: str) -> None:
    """Fail in one line when the engine ``rollout.engine`` names cannot run here."""
    if engine == "vllm":
        require_vllm()


def make_engine(cfg: RolloutConfig, model: nn.Module, *, eos_id: int, pad_id: int, seed: int = 0) -> Engine:
    if cfg.engine == "vllm":
        from drpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, precision=cfg.precision, eos_id=eos_id, pad_id=pad_id, max_batch=cfg.max_batch,
                          seed=seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
                          max_model_len=getattr(model.config, "max_position_embeddings", None))
    return HFRolloutEngine(model, precision=cfg.precision, eos_id=eos_id, pad_id=pad_id,
                           max_batch=cfg.max_batch)
