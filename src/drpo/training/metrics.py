"""Combining per-micro-batch metrics into per-step metrics, by the reductions the metrics declare.

Every metric of :func:`drpo.policy_loss` declares how it combines (:data:`drpo.objectives.metrics.
REDUCTIONS`): a mean weighted by a count it reports alongside (``tokens``, ``signal_tokens``, or the
tokens of one mu bucket), an extreme, a sum, or the per-optimiser-step sum of the loss. So the value
for several micro-batches equals the value for the batch they make up.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Mapping, Optional

from drpo.objectives.metrics import DEFAULT_REDUCTION, REDUCTIONS

Reduction = tuple[str, Optional[str]]


class MetricAccumulator:
    def __init__(self, reductions: Mapping[str, Reduction] = REDUCTIONS,
                 default: Reduction = DEFAULT_REDUCTION) -> None:
        self.reductions, self.default = reductions, default
        self._sum: dict[str, float] = defaultdict(float)   # mean: sum(v * count); sum / step_sum: sum(v)
        self._weight: dict[str, float] = defaultdict(float)  # mean: sum(count)
        self._ext: dict[str, float] = {}                     # max / min
        self._steps = 0

    def add(self, metrics: Mapping[str, float]) -> None:
        """One micro-batch's metrics (a dict from :func:`drpo.policy_loss` plus the trainer's own)."""
        for k, v in metrics.items():
            kind, count = self.reductions.get(k, self.default)
            if kind == "mean":
                w = float(metrics.get(count, 0.0))
                if w > 0:
                    self._sum[k] += v * w
                    self._weight[k] += w
            elif kind in ("max", "min"):
                if count is not None and not metrics.get(count, 0.0) > 0:
                    continue
                best = max if kind == "max" else min
                self._ext[k] = v if k not in self._ext else best(self._ext[k], v)
            elif kind in ("sum", "step_sum"):
                self._sum[k] += v
            else:
                raise ValueError(f"metric {k!r}: unknown reduction {kind!r}")

    def end_optimizer_step(self) -> None:
        self._steps += 1

    def result(self, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self._sum.items():
            kind, _ = self.reductions.get(k, self.default)
            if kind == "mean":
                out[prefix + k] = v / self._weight[k]
            elif kind == "step_sum":
                out[prefix + k] = v / max(self._steps, 1)
            else:
                out[prefix + k] = v
        out.update({prefix + k: v for k, v in self._ext.items()})
        return out


class Clock:
    """Wall-clock seconds per phase of a step: ``with clock("time/backward"): ...`` adds to ``seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
