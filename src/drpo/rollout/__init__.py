"""drpo.rollout: everything between the policy's weights and a scored batch of samples.

The trainer's entry point is :func:`build_rollout` (synchronous, or a worker process with bounded
staleness; :mod:`drpo.rollout.service`) with a :class:`Collector` (prompts -> engine -> rewards).
"""
from drpo.rollout.collect import Collected, Collector
from drpo.rollout.engine import EngineUnavailable, HFRolloutEngine, RolloutBatch, SamplingParams
from drpo.rollout.factory import make_engine, require_engine
from drpo.rollout.precision import trainer_precision_, use_bf16_compute_
from drpo.rollout.service import RolloutWorkerError, build_rollout

__all__ = ["Collected", "Collector", "EngineUnavailable", "HFRolloutEngine", "RolloutBatch", "SamplingParams",
           "make_engine", "require_engine", "trainer_precision_", "use_bf16_compute_", "RolloutWorkerError", "build_rollout"]
