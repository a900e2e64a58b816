"""Mixture-of-Experts routing: record the experts each token is routed to, compare two models'
choices, and replay one model's choices in another (routing replay).

In an MoE model every layer's router scores the experts of each token and keeps the top-k:

    p = softmax(h W_r^T)   (over E experts),   S = top-k(p),   g_e = p_e / sum_{j in S} p_j  (e in S)

A rollout engine at low precision computes h W_r^T slightly differently from the trainer, so for some
tokens its top-k set S differs: the token went through other experts, and its log-prob differs far
more than rounding alone would make it (the main source of training-inference mismatch in MoE LLMs).

    router flip fraction = share of (token, layer) decisions whose top-k SET differs between the two

Routing replay (verl's R3, slime, prime-rl) runs the trainer's forward with the engine's sets S and
the trainer's own gates g_e = p_e / sum_{j in S} p_j, so gradients still reach the router.

Routing tensors are laid out like the rollout batch: (N, P + R, L, k) expert ids for every position
of [left-padded prompt | response] and every MoE layer; -1 where no decision was recorded.

Works with routers that map hidden states (T, H) to (router_logits, scores, indices) as transformers'
Qwen3-MoE ``Qwen3MoeTopKRouter`` does.

Experts implementation. The fused experts hold W_gu (E, 2I, H) and W_d (E, H, I); for the T x k
(token t, slot j) pairs with expert e = S_tj and gate g_tj

    y_tj = W_d[e] (act(W_g[e] h_t) * W_u[e] h_t),      out_t = sum_j g_tj y_tj

transformers computes this with the implementation named by ``config._experts_implementation``:

    eager       a Python loop over the experts hit, one small matmul pair per expert;
    batched_mm  one bmm per projection over the T k pairs, after gathering a copy of the expert's
                weights for every pair (2I x H + H x I floats per pair: 0.44 GB per layer for one
                32-sequence minibatch of the default RL step, kept for the backward);
    grouped_mm  the pairs sorted by expert, then one grouped matmul per projection
                (``torch.nn.functional.grouped_mm``; CPU kernel in torch >= 2.9, else transformers
                falls back to a per-expert loop).

drpo runs :data:`EXPERTS_IMPLEMENTATION` = ``grouped_mm`` (:func:`use_library_experts_`; set in
:func:`drpo.models.tiny.tiny_qwen3_moe_config` and applied by ``load_policy`` to every policy loaded).
Why, measured with ``benchmarks/moe_cost.py`` (benchmarks/README.md), forward + backward of the
default RL step's batch on 1 CPU thread: grouped_mm and eager cost the same for the tiny MoE, about
the dense model's cost per token (torch's CPU grouped kernel is itself a loop of per-expert matmuls,
in C++), while batched_mm costs about 24x as much (it moves the gathered weight copies). grouped_mm
is also one op per projection whatever the number of experts, the fast path on a GPU, and the one
transformers itself picks when a config names none (5.10 and 5.19: the tiny MoE already ran it
before drpo named it). It gives the eager loop's outputs and gradients to float tolerance
(tests/test_moe.py). transformers does not save the choice in config.json, hence ``load_policy``.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Optional

import torch
from torch import nn


def routers(model: nn.Module) -> list[nn.Module]:
    """The top-k routers of ``model`` in layer order (empty for a dense model)."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter") and hasattr(m, "top_k")]


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """The fused expert blocks (3-D ``gate_up_proj`` / ``down_proj`` weights) of ``model``."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter) and m.gate_up_proj.dim() == 3]


def is_moe(model: nn.Module) -> bool:
    return bool(routers(model))


EXPERTS_IMPLEMENTATION = "grouped_mm"  # transformers' experts_implementation drpo runs (see the module docstring)


def use_library_experts_(model: nn.Module, implementation: str = EXPERTS_IMPLEMENTATION) -> None:
    """Make the fused experts of ``model`` run transformers' ``implementation`` (no-op for a model
    without fused experts: a dense model, or an MoE of transformers 4 with per-expert modules).
    An experts forward replaced by :func:`drpo.rollout.precision.use_bf16_compute_` stays replaced."""
    if not experts_modules(model):
        return
    if getattr(model.config, "_experts_implementation", None) != implementation:
        model.set_experts_implementation(implementation)


def _route(router: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(router logits (T, E), probabilities (T, E) in float32) for flattened hidden states."""
    logits = nn.functional.linear(hidden, weight)
    return logits, torch.softmax(logits, dim=-1, dtype=torch.float)


def _gates(router: nn.Module, probs: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    g = probs.gather(-1, idx)
    if getattr(router, "norm_topk_prob", False):
        g = g / g.sum(dim=-1, keepdim=True)
    return g.to(dtype)


def _routing_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Router forward with the hooks this module adds: optional input/weight rounding (a simulated
    low-precision engine), recording of the chosen sets, and replay of given sets."""
    h = hidden_states.reshape(-1, self.hidden_dim)
    w = self.weight
    if self._drpo_round is not None:
        h, w = self._drpo_round(h), self._drpo_round(w)
    logits, probs = _route(self, h, w)
    if self._drpo_round is not None:
        logits = self._drpo_round(logits)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    own = torch.topk(probs, self.top_k, dim=-1).indices
    idx = own
    given: Optional[torch.Tensor] = self._drpo_given
    if given is not None:
        given = given.reshape(-1, self.top_k).to(own.device)
        valid = (given >= 0).all(-1)
        self._drpo_seen.append((own, given, valid))
        if self._drpo_replay:
            idx = torch.where(valid[:, None], given, own)
    if self._drpo_record is not None:
        self._drpo_record.append(own)
    return logits, _gates(self, probs, idx, logits.dtype), idx


def install_routing_hooks(model: nn.Module, round_fn=None) -> list[nn.Module]:
    """Give every router of ``model`` the hooked forward (idempotent). ``round_fn`` rounds the router's
    input, weight and logits (a bf16 engine); None computes in the model's own precision."""
    rs = routers(model)
    for r in rs:
        if not hasattr(r, "_drpo_given"):
            r._drpo_given, r._drpo_replay, r._drpo_record, r._drpo_seen = None, False, None, []
            r.forward = types.MethodType(_routing_forward, r)
        r._drpo_round = round_fn if round_fn is not None else getattr(r, "_drpo_round", None)
        if not hasattr(r, "hidden_dim"):
            r.hidden_dim = r.weight.shape[-1]
    return rs


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Within the block, every router appends its chosen sets (T, k) per forward call to its list."""
    rs = install_routing_hooks(model)
    logs: list[list[torch.Tensor]] = [[] for _ in rs]
    for r, log in zip(rs, logs):
        r._drpo_record = log
    try:
        yield logs
    finally:
        for r in rs:
            r._drpo_record = None


@contextlib.contextmanager
def given_routing(model: nn.Module, routing: Optional[torch.Tensor], replay: bool) -> Iterator["RoutingStats"]:
    """Run forwards over sequences laid out like ``routing`` (N, T, L, k). With ``replay`` the routers
    use the given sets (where recorded); either way the block's :class:`RoutingStats` counts the
    decisions whose sets differ from the model's own."""
    stats = RoutingStats()
    if routing is None:
        yield stats
        return
    rs = install_routing_hooks(model)
    if routing.shape[2] != len(rs):
        raise ValueError(f"routing holds {routing.shape[2]} layers, the model has {len(rs)} routers")
    for layer, r in enumerate(rs):
        r._drpo_given, r._drpo_replay, r._drpo_seen = routing[:, :, layer], replay, []
    try:
        yield stats
    finally:
        for r in rs:
            for own, given, valid in r._drpo_seen:
                same = (own.sort(-1).values == given.sort(-1).values).all(-1)
                stats.decisions += int(valid.sum())
                stats.flips += int((valid & ~same).sum())
            r._drpo_given, r._drpo_replay, r._drpo_seen = None, False, []


class RoutingStats:
    """Counts of routing decisions compared in a block of forwards."""

    def __init__(self) -> None:
        self.decisions = 0
        self.flips = 0

    def add(self, other: "RoutingStats") -> None:
        self.decisions += other.decisions
        self.flips += other.flips

    @property
    def flip_frac(self) -> float:
        return self.flips / self.decisions if self.decisions else 0.0


def assemble(calls: list[list[torch.Tensor]], n: int) -> torch.Tensor:
    """Per-position routing (n, T, L, k) from the recorded calls of a KV-cached generation: call 0
    covers the n prompts' P positions, each later call one new position per sequence."""
    layers = []
    for per_call in calls:
        layers.append(torch.cat([c.reshape(n, -1, c.shape[-1]) for c in per_call], dim=1))
    return torch.stack(layers, dim=2)
