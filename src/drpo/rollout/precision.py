"""Numeric precision of a model copy: fp32, bf16, or simulated FP8, as an inference engine runs it.

On a CPU there is no fast bf16/fp8 matmul, so low precision is *simulated*: values are rounded to
the low-precision grid and the arithmetic runs in float32.

    fp32  weights and activations in float32 (no change).
    bf16  every Linear/Embedding weight rounded to bfloat16; every Linear's input and output
          rounded to bfloat16 (bf16 compute with fp32 accumulation).
    fp8   weights quantised to float8 e4m3 with a per-output-channel scale
              s_o = max_i |W_oi| / 448,   W_oi <- s_o * e4m3(W_oi / s_o)
          then bf16 activations as above (the W8A16 scheme inference engines use).

The same rounding with a straight-through gradient (:class:`RoundSTE`) gives a "bf16 trainer"
that keeps fp32 master weights.

Mixture-of-Experts models (:mod:`drpo.models.moe`): the fused expert weights (E, out, in) are
quantised like Linear weights (one scale per expert and output channel) and their matmuls rounded
like a Linear's; the router stays in bf16 (weights, input and logits rounded), as FP8 engines keep
their routers unquantised. Its top-k then flips for some tokens against an fp32 trainer.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from drpo.models.moe import experts_modules, install_routing_hooks, routers

PRECISIONS = ("fp32", "bf16", "fp8")
FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float values to the nearest value representable in ``dtype``, returned in x's dtype."""
    return x.to(dtype).to(x.dtype)


def quantize_fp8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise a (out, in) weight to float8 e4m3 with one scale per output channel."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).to(w.dtype)


class RoundSTE(torch.autograd.Function):
    """Forward: round to bf16 values. Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return round_to(x, torch.bfloat16)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def _weight_modules(model: nn.Module) -> Iterable[nn.Module]:
    return (m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)))


@torch.no_grad()
def quantize_weights_(model: nn.Module, precision: str) -> None:
    """Round the weights of every Linear/Embedding in place for ``precision`` (fp32: no-op).
    Norm weights stay in float32, as inference engines keep them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
    if precision == "fp32":
        return
    seen: set[int] = set()
    for m in _weight_modules(model):
        w = m.weight
        if id(w) in seen:  # tied embeddings / LM head: quantise once
            continue
        seen.add(id(w))
        if precision == "fp8" and isinstance(m, nn.Linear):
            w.copy_(quantize_fp8_per_channel(w))
        else:
            w.copy_(round_to(w, torch.bfloat16))
    for m in experts_modules(model):
        for w in (m.gate_up_proj, m.down_proj):  # (E, out, in): one scale per expert and output channel
            w.copy_(quantize_fp8_per_channel(w) if precision == "fp8" else round_to(w, torch.bfloat16))
    for r in routers(model):
        r.weight.copy_(round_to(r.weight, torch.bfloat16))


def _bf16_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = RoundSTE.apply(self.weight) if self._drpo_round_weight else self.weight
    return RoundSTE.apply(nn.functional.linear(RoundSTE.apply(x), w, self.bias))


def _bf16_embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(nn.Embedding.forward(self, ids))


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[e-1], offsets[e]) of ``x`` (S, in) times ``w[e]`` (in, out), for every expert e:
    transformers' grouped-matmul dispatcher (``torch.nn.functional.grouped_mm`` where torch has it
    for the device and dtype, else its per-expert loop), the one its ``grouped_mm`` experts use."""
    from transformers.integrations.moe import _grouped_mm as library_grouped_mm

    return library_grouped_mm(x, w, offs=offsets)


def _bf16_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The fused experts' forward with every matmul's input and output rounded to bf16 (R), batched
    like transformers' ``grouped_mm`` experts. With T tokens, k slots, S = T k pairs (t, j) sorted by
    expert e = S_tj (the rows of one expert contiguous), g_tj the gate weight:

        x    = R(h)                                        (T, H)
        a_s  = R(x_t W_gu[e]^T),   [gate | up] = a_s       (S, 2I)   one grouped matmul
        z_s  = R(act(gate) * up)                           (S, I)
        y_s  = R(z_s W_d[e]^T)                             (S, H)    one grouped matmul
        out_t = R(sum_j g_tj y_tj)                         (T, H)

    The rounding points are those of the per-expert loop this replaced (same values up to the order
    of float additions); R is :class:`RoundSTE`, so gradients pass straight through (bf16 trainer)."""
    R = RoundSTE.apply
    T, k = top_k_index.shape
    x = R(hidden_states)
    w_gu = R(self.gate_up_proj) if self._drpo_round_weight else self.gate_up_proj  # (E, 2I, H)
    w_d = R(self.down_proj) if self._drpo_round_weight else self.down_proj  # (E, H, I)
    expert = top_k_index.reshape(-1)  # pair s = t k + j
    order = torch.argsort(expert, stable=True)  # pairs grouped by expert
    offsets = torch.bincount(expert, minlength=w_gu.shape[0]).cumsum(0).to(torch.int32)
    gate, up = R(_grouped_mm(x[order // k], w_gu.transpose(-2, -1), offsets)).chunk(2, dim=-1)
    y = R(_grouped_mm(R(self.act_fn(gate) * up), w_d.transpose(-2, -1), offsets))
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=order.device)
    y = y[unsort].view(T, k, -1)  # back to (token, slot)
    return R((y * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1))


def use_bf16_compute_(model: nn.Module, *, round_weights: bool) -> None:
    """Make every Linear compute as bf16 hardware would: inputs and outputs rounded to bf16
    (fp32 accumulation), and with ``round_weights`` the weights too, on the fly (straight-through
    gradient, so float32 master weights train). Embedding outputs are rounded likewise; MoE experts
    and routers too (see the module docstring).
    Only the instances' ``forward`` changes: parameters and state_dict keep their names."""
    import types

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m._drpo_round_weight = round_weights
            m.forward = types.MethodType(_bf16_linear_forward, m)
        elif isinstance(m, nn.Embedding):
            m.forward = types.MethodType(_bf16_embedding_forward, m)
    for m in experts_modules(model):
        m._drpo_round_weight = round_weights
        m.forward = types.MethodType(_bf16_experts_forward, m)
    install_routing_hooks(model, round_fn=RoundSTE.apply)
