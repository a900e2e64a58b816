"""drpo.rollout: everything between the policy's weights and a scored batch of samples.

The trainer's entry point is :func:`build_rollout`, a :class:`Rollout` (synchronous, or a worker process with bounded
staleness; :mod:`drpo.rollout.service`) with a :class:`Collector` (prompts -> engine -> rewards) and an
:class:`Engine` (:func:`make_engine`).
"""
from drpo.rollout.collect import Collected, Collector
from drpo.rollout.engine import EngineUnavailable, HFRolloutEngine, RolloutBatch, SamplingParams
from drpo.rollout.factory import Engine, make_engine, require_engine
from drpo.rollout.precision import trainer_precision_, use_bf16_compute_
from drpo.rollout.service import Rollout, RolloutWorkerError, build_rollout

__all__ = ["Collected", "Collector", "EngineUnavailable", "HFRolloutEngine", "RolloutBatch", "SamplingParams", "Engine",
           "make_engine", "require_engine", "trainer_precision_", "use_bf16_compute_", "Rollout", "RolloutWorkerError",
           "build_rollout"]
