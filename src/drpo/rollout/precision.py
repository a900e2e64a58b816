"""Numeric precision of a model copy: fp32, bf16, or simulated FP8 / NVFP4 / INT4, as an inference
engine runs it.

On a CPU there is no fast bf16/fp8/fp4 matmul, so low precision is *simulated*: values are rounded
to the low-precision grid and the arithmetic runs in float32.

    fp32  weights and activations in float32 (no change).
    bf16  every Linear/Embedding weight rounded to bfloat16; every Linear's input and output
          rounded to bfloat16 (bf16 compute with fp32 accumulation).
    fp8   weights quantised to float8 e4m3 with a per-output-channel scale
              s_o = max_i |W_oi| / 448,   W_oi <- s_o * e4m3(W_oi / s_o)
          then bf16 activations as above (the W8A16 scheme inference engines use).
    fp4   NVFP4 weights (:func:`quantize_nvfp4`): FP4 E2M1 values, one FP8 E4M3 scale per block of
          B = 16 consecutive weights along the input dimension, and one float32 scale per tensor:
              g     = max_{o,i} |W_oi| / (6 * 448)                     (global scale, float32)
              s_ob  = e4m3(max_{i in block b} |W_oi| / (6 * g))          (block scale, on the e4m3 grid)
              W_oi <- g * s_ob * e2m1(W_oi / (g * s_ob)),   i in block b
          e2m1(x) rounds to the nearest of {0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6} (|x| > 6: +-6),
          ties to the even encoding (what ``torch.round``'s half-to-even gives, see
          :func:`round_to_e2m1`). 6 and 448 are the largest E2M1 and E4M3 values, so the block
          with the tensor's largest weight gets s_ob = 448 and that weight lands on 6.
    int4  INT4 weight-only, symmetric, round to nearest without calibration (GPTQ/AWQ's format and
          kernels, not their calibration; :func:`quantize_int4_groupwise`), one float32 scale per
          group of G = 128 consecutive weights along the input dimension (a row shorter than G is
          one group):
              s_og  = max_{i in group g} |W_oi| / 7,   W_oi <- s_og * clamp(round(W_oi / s_og), -8, 7)
    An input dimension that is not a multiple of B (or G) ends in a shorter last block (group): it is
    zero-padded, which changes no block maximum, and the padding is dropped afterwards.

fp4 and int4 keep bf16 activations as fp8 does: W4A16, as the NVFP4/MXFP4/INT4 weight-only kernels
(e.g. Marlin) run on GPUs without FP4 tensor cores; it is the weights' rounding that widens the
mismatch. Embeddings stay bf16 at every precision below fp32; so does the LM head at fp4/int4, as
4-bit recipes keep it unquantised (fp8 quantises an untied head like any Linear; the built-in models
tie it to the embedding, so it is bf16 at every precision).

The same rounding with a straight-through gradient (:class:`RoundSTE`) gives a "bf16 trainer"
that keeps fp32 master weights.

Mixture-of-Experts models (:mod:`drpo.models.moe`): the fused expert weights (E, out, in) are
quantised like Linear weights (fp8: one scale per expert and output channel; fp4/int4: blocks or
groups along ``in`` per expert and output channel, and fp4's global scale g per expert, over its
(out, in) matrix) and their matmuls rounded like a Linear's; the router stays in bf16 (weights,
input and logits rounded), as FP8 engines keep their routers unquantised. Its top-k then flips for
some tokens against an fp32 trainer.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from drpo.models.moe import experts_modules, install_routing_hooks, routers

PRECISIONS = ("fp32", "bf16", "fp8", "fp4", "int4")
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
FP4_MAX = 6.0  # largest FP4 E2M1 value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the non-negative FP4 E2M1 values
NVFP4_BLOCK = 16  # weights per NVFP4 block (one e4m3 scale each), along the input dimension
INT4_GROUP = 128  # weights per INT4 group (one scale each), along the input dimension
INT4_MIN, INT4_MAX = -8, 7


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float values to the nearest value representable in ``dtype``, returned in x's dtype."""
    return x.to(dtype).to(x.dtype)


def quantize_fp8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise a (out, in) weight to float8 e4m3 with one scale per output channel."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).to(w.dtype)


def _blocked(w: torch.Tensor, size: int) -> torch.Tensor:
    """(..., in) -> (..., ceil(in / size), size), the last block zero-padded."""
    pad = -w.shape[-1] % size
    if pad:
        w = nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], w.shape[-1] // size, size)


def _unblocked(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_blocked`: (..., nb, size) -> (..., n), the padding dropped."""
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :n]


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest FP4 E2M1 value, saturating at +-6.

    The grid's spacing is 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6], so e2m1(x) =
    sign(x) * step * round(|x| / step) with step the spacing of |x|'s binade. ``torch.round``
    rounds halves to even, and on this grid that is IEEE round-half-to-even of the encoding:
    0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4."""
    a = x.abs().clamp(max=FP4_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.sign(x) * torch.round(a / step) * step


def nvfp4_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's two scales of a (..., out, in) weight, in float32: the global scale g (..., 1, 1),
    one per (out, in) matrix, and the block scales s (..., out, ceil(in / 16)) on the e4m3 grid:

        g = max |W| / (6 * 448),    s_ob = e4m3(max_{i in block b} |W_oi| / (6 * g))

    A matrix of zeros gets g = 1 (its blocks' s = 0); a block whose s would be below e4m3's
    smallest subnormal (2^-9) gets s = 0, as on the hardware, and then quantises to zeros."""
    w32 = w.float()
    g = w32.abs().amax(dim=(-2, -1), keepdim=True) / (FP4_MAX * FP8_MAX)
    g = torch.where(g > 0, g, torch.ones_like(g))
    block_max = _blocked(w32, NVFP4_BLOCK).abs().amax(dim=-1)  # (..., out, nb)
    s = (block_max / (FP4_MAX * g)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    return g, s


def quantize_nvfp4(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise a (..., out, in) weight to NVFP4 (see the module docstring): W_oi <- g * s_ob *
    e2m1(W_oi / (g * s_ob)) for i in block b of 16 along ``in``; leading dims (MoE experts) are
    separate matrices, each with its own g."""
    g, s = nvfp4_scales(w)
    scale = (g * s)[..., None]  # (..., out, nb, 1): the full scale of each block
    blocks = _blocked(w.float(), NVFP4_BLOCK)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, round_to_e2m1(blocks / safe), torch.zeros_like(blocks))  # the E2M1 values
    return _unblocked(q * scale, w.shape[-1]).to(w.dtype)


def int4_group_size(n_in: int) -> int:
    """The INT4 group along an input dimension of ``n_in``: 128, or the whole row if shorter."""
    return min(INT4_GROUP, n_in)


def int4_scales(w: torch.Tensor) -> torch.Tensor:
    """The INT4 scales of a (..., out, in) weight, float32 (..., out, ceil(in / G)):
    s_og = max_{i in group g} |W_oi| / 7 (a group of zeros: 1e-12, so that it stays zero)."""
    groups = _blocked(w.float(), int4_group_size(w.shape[-1]))
    return (groups.abs().amax(dim=-1) / INT4_MAX).clamp(min=1e-12)


def quantize_int4_groupwise(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise a (..., out, in) weight to symmetric INT4 with one scale per group of
    G = 128 along ``in``: W_oi <- s_og * clamp(round(W_oi / s_og), -8, 7), s_og = max |W_o,group| / 7
    (round to nearest, halves to even)."""
    s = int4_scales(w)[..., None]  # (..., out, ng, 1)
    groups = _blocked(w.float(), int4_group_size(w.shape[-1]))
    q = torch.round(groups / s).clamp(INT4_MIN, INT4_MAX)  # the INT4 values
    return _unblocked(q * s, w.shape[-1]).to(w.dtype)


#: The weight quantiser of each precision that puts Linear and expert weights on a grid coarser than bf16.
WEIGHT_QUANTISERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp8": quantize_fp8_per_channel, "fp4": quantize_nvfp4, "int4": quantize_int4_groupwise}


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
    """Round the weights of every Linear/Embedding in place for ``precision`` (fp32: no-op):
    Linear and MoE expert weights with the precision's quantiser (:data:`WEIGHT_QUANTISERS`; bf16:
    rounded to bf16), embeddings and routers to bf16. fp4/int4 also keep an untied LM head in
    bf16, as 4-bit recipes do (fp8 quantises it like any Linear).
    Norm weights stay in float32, as inference engines keep them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {list(PRECISIONS)}")
    if precision == "fp32":
        return
    quantise = WEIGHT_QUANTISERS.get(precision)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()
    for m in _weight_modules(model):
        w = m.weight
        if id(w) in seen:  # tied embeddings / LM head: quantise once
            continue
        seen.add(id(w))
        four_bit_head = precision in ("fp4", "int4") and m is head
        if quantise is not None and isinstance(m, nn.Linear) and not four_bit_head:
            w.copy_(quantise(w))
        else:
            w.copy_(round_to(w, torch.bfloat16))
    for m in experts_modules(model):
        for w in (m.gate_up_proj, m.down_proj):  # (E, out, in): scales per expert and output channel (and block)
            w.copy_(quantise(w) if quantise is not None else round_to(w, torch.bfloat16))
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


def loop_bf16_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The readable reference of :func:`_bf16_experts_forward` (what the engine ran before it was
    batched): a Python loop over the experts hit, one small matmul pair each, with the same rounding
    points. Tests check the batched forward against it; benchmarks/moe_cost.py times both."""
    R = RoundSTE.apply
    x = R(hidden_states)
    w_gu = R(self.gate_up_proj) if self._drpo_round_weight else self.gate_up_proj
    w_d = R(self.down_proj) if self._drpo_round_weight else self.down_proj
    out = torch.zeros_like(x)
    for e in top_k_index.unique().tolist():
        pos, tok = torch.where(top_k_index.T == e)
        gate, up = R(nn.functional.linear(x[tok], w_gu[e])).chunk(2, dim=-1)
        y = R(nn.functional.linear(R(self.act_fn(gate) * up), w_d[e]))
        out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
    return R(out)


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


def trainer_precision_(model: nn.Module, precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Set up the trainer's own precision (``train.precision``): fp32 leaves the model as is; bf16 on CUDA
    returns torch.bfloat16 for autocast (real bf16 compute, fp32 master weights); bf16 on a CPU, which has no
    fast bf16, simulates it by rounding (:func:`use_bf16_compute_`, straight-through gradients) and returns
    None. Call it after the rollout engine copied the fp32 weights."""
    if precision != "bf16":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    use_bf16_compute_(model, round_weights=True)
    return None
