"""Sampled-token log-probabilities straight from hidden states and the LM-head weight.

For hidden states ``h`` (N x H), LM-head weight ``W`` (V x H), optional bias ``b`` (V)
and temperature ``T``, the temperature-scaled logits and log-probabilities are

    z'      = (h @ W.T + b) / T                       (N x V)
    lse_i   = logsumexp_j z'_ij
    log p_i = z'_{i, t_i} - lse_i                     (t_i: the sampled token)
    H_i     = lse_i - sum_j p_ij z'_ij                (entropy, = -sum_j p_ij log p_ij)

With V = 151,936 (Qwen) a batch of 4,096 tokens has 2.5 GB of float32 logits, and autograd
keeps several tensors of that size alive. :func:`chunked_logprobs` runs the same maths over
``chunk_size`` tokens at a time: the forward keeps only ``lse`` (and ``H``) per token, and the
backward recomputes each chunk's logits and turns them, in place, into the logits gradient

    dlog p_i / dz'_ij = 1[j = t_i] - p_ij
    dH_i     / dz'_ij = -p_ij (log p_ij + H_i)
    dL/dz_ij        = (g_i (1[j = t_i] - p_ij) - e_i p_ij (log p_ij + H_i)) / T

(``g``, ``e``: the incoming gradients of log p and H), then accumulates
``dL/dh = dL/dz @ W``, ``dL/dW = dL/dz.T @ h`` and ``dL/db = sum_i dL/dz_i``.
The price is one extra (N x V x H) matmul: the backward recomputes the forward's logits.

All arithmetic is float32 whatever the input dtype: a bf16/fp16 weight is cast to float32
once per call (one V x H float32 copy), the outputs are float32, and the gradients are
returned in the dtypes of ``hidden``, ``weight`` and ``bias``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunked_logprobs", "naive_logprobs", "topk_logprobs"]


# ----------------------------------------------------------------------------- validation


def _validate(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    id_dims: int,
    temperature: float,
    chunk_size: int,
    bias: Tensor | None,
    mask: Tensor | None,
) -> None:
    """Raise ``ValueError`` for inconsistent shapes, dtypes, token ids or hyper-parameters.

    ``ids`` is ``targets`` (``id_dims = 0``: shape ``hidden.shape[:-1]``) or the top-K ids
    (``id_dims = 1``: shape ``hidden.shape[:-1] + (K,)``). Ids are range-checked only where
    ``mask`` is True, so padding may carry any value (e.g. -100).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last (hidden-size) dimension")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (vocab, hidden={hidden.shape[-1]}), got {tuple(weight.shape)}"
        )
    lead = tuple(hidden.shape[:-1])
    if tuple(ids.shape[: ids.dim() - id_dims]) != lead or ids.dim() != len(lead) + id_dims:
        name = "targets" if id_dims == 0 else "ids"
        raise ValueError(
            f"{name} shape {tuple(ids.shape)} does not match hidden's leading shape {lead}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match {lead}")
    checked = ids if mask is None else ids[mask]
    if checked.numel() > 0:
        lo, hi = int(checked.min()), int(checked.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"token ids must lie in [0, {weight.shape[0]}), got [{lo}, {hi}]")


# ----------------------------------------------------------------------------- chunk maths


def _scaled_logits(
    h: Tensor, w32: Tensor, b32: Tensor | None, temperature: float
) -> Tensor:
    """z' = (h @ W.T + b) / T for one chunk of tokens, in float32 (a fresh n x V buffer)."""
    z = h.float() @ w32.T
    if b32 is not None:
        z += b32
    if temperature != 1.0:
        z /= temperature
    return z


def _lse_and_entropy(z: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """lse_i = m_i + log s_i and H_i = log s_i - (sum_j e_ij (z'_ij - m_i)) / s_i,
    with m_i = max_j z'_ij, e_ij = exp(z'_ij - m_i), s_i = sum_j e_ij.

    Overwrites ``z`` (the chunk buffer) to avoid a second n x V tensor when no entropy is needed.
    """
    m = z.amax(dim=-1, keepdim=True)
    z -= m
    if not with_entropy:
        s = z.exp_().sum(dim=-1)
        return m.squeeze(-1) + s.log(), None
    e = z.exp()
    s = e.sum(dim=-1)
    entropy = s.log() - e.mul_(z).sum(dim=-1) / s
    return m.squeeze(-1) + s.log(), entropy


def _logits_grad(
    z: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    """dL/dz_ij = (g_i (1[j = t_i] - p_ij) - e_i p_ij (log p_ij + H_i)) / T, written into ``z``.

    ``z`` holds z' on entry; ``None`` incoming gradients count as zero.
    """
    logp = z.sub_(lse.unsqueeze(-1))
    if grad_entropy is None:
        grad = logp.exp_().mul_(-grad_logp.unsqueeze(-1))
    else:
        p = logp.exp()
        # -p (g + e (log p + H)), reusing the log p buffer
        grad = logp.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
        if grad_logp is not None:
            grad.add_(grad_logp.unsqueeze(-1))
        grad.mul_(p).neg_()
    if grad_logp is not None:
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
    if temperature != 1.0:
        grad /= temperature
    return grad


# ----------------------------------------------------------------------------- autograd


class _ChunkedLogProb(torch.autograd.Function):
    """log p(t_i) (and H_i) over token chunks; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # (N, H)
        weight: Tensor,  # (V, H)
        bias: Tensor | None,  # (V,)
        targets: Tensor,  # (N,)
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _scaled_logits(hidden[s:e], w32, b32, temperature)
            target_z = z.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1)
            chunk_lse, chunk_entropy = _lse_and_entropy(z, with_entropy)
            lse[s:e] = chunk_lse
            logp[s:e] = target_z - chunk_lse
            if with_entropy:
                entropy[s:e] = chunk_entropy
            del z  # free this chunk's logits before the next chunk's are allocated
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, temperature = hidden.shape[0], ctx.temperature
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        grad_logp = None if grad_logp is None else grad_logp.float()
        grad_entropy = None if grad_entropy is None else grad_entropy.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        grad_b = torch.zeros_like(b32) if need_b else None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h32 = hidden[s:e].float()
            z = _scaled_logits(h32, w32, b32, temperature)
            dz = _logits_grad(
                z,
                targets[s:e],
                lse[s:e],
                None if entropy is None else entropy[s:e],
                None if grad_logp is None else grad_logp[s:e],
                None if grad_entropy is None else grad_entropy[s:e],
                temperature,
            )
            if need_h:
                grad_h[s:e] = dz @ w32
            if need_w:
                grad_w.addmm_(dz.T, h32)
            if need_b:
                grad_b += dz.sum(dim=0)
            del z, dz  # free this chunk's logits before the next chunk's are allocated
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- public API


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(t) = z'_t - logsumexp(z'), z' = (hidden @ weight.T + bias) / T, ``chunk_size`` tokens at a time.

    Args:
        hidden: (..., H) final hidden states, any float dtype.
        weight: (V, H) LM-head weight.
        targets: (...) sampled token ids.
        temperature: T > 0, the sampling temperature.
        chunk_size: tokens per chunk; peak extra memory is about one (chunk_size x V) float32
            buffer (two with entropy), instead of several (N x V) tensors.
        return_entropy: also return H = -sum_j p_j log p_j, differentiable.
        bias: optional (V,) LM-head bias.
        mask: optional bool (...); masked-out positions are skipped, return 0 and get zero
            gradient, and their target ids are not range-checked.

    Returns:
        float32 log-probabilities of shape ``targets.shape`` (and the entropy, same shape).
        Gradients flow to ``hidden``, ``weight`` and ``bias`` in their own dtypes.
    """
    _validate(hidden, weight, targets, 0, temperature, chunk_size, bias, mask)
    lead = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    if mask is not None:
        flat_mask = mask.reshape(-1)
        hidden, targets = hidden[flat_mask], targets[flat_mask]
    logp, entropy = _ChunkedLogProb.apply(
        hidden, weight, bias, targets, float(temperature), chunk_size, return_entropy
    )
    if mask is not None:
        # masked_scatter keeps the graph connected even when every position is masked
        zeros = logp.new_zeros(flat_mask.shape)
        logp = zeros.masked_scatter(flat_mask, logp)
        entropy = None if entropy is None else zeros.masked_scatter(flat_mask, entropy)
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp


def naive_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference for :func:`chunked_logprobs`: full (N x V) logits, ``log_softmax``, ``gather``.

    log p = log_softmax((hidden @ weight.T + bias) / T)[t],  H = -sum_j p_j log p_j.
    Computes in float32, or float64 when ``hidden`` is float64 (for exact references).
    ``chunk_size`` is validated and ignored; masked positions are zeroed, not skipped.
    """
    _validate(hidden, weight, targets, 0, temperature, chunk_size, bias, mask)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    logp, entropy, _ = logprobs_from_logits(z, targets, temperature=temperature,
                                            return_entropy=return_entropy, mask=mask)
    return (logp, entropy) if return_entropy else logp


def logprobs_from_logits(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    extra_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """From full logits z (..., V): log p = log_softmax(z / T) at ``targets`` (...), the entropy
    H = -sum_j p_j log p_j when asked, and log p at ``extra_ids`` (..., K) when given (no mask).
    Computes in float32 (float64 logits stay float64); masked positions are zeroed."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    safe_targets = targets.long() if mask is None else targets.long().masked_fill(~mask, 0)
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1) if return_entropy else None
    extra = logp_all.gather(-1, extra_ids.long()) if extra_ids is not None else None
    if mask is not None:
        logp = logp.masked_fill(~mask, 0.0)
        entropy = None if entropy is None else entropy.masked_fill(~mask, 0.0)
    return logp, entropy, extra


@torch.no_grad()
def topk_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """log p(ids[..., k]) = z'[ids[..., k]] - logsumexp(z') for K given ids per token, no gradient.

    For DPPO Top-K: the trainer's log-probabilities at the rollout engine's top-K token ids.

    Args:
        hidden: (..., H); weight: (V, H); ids: (..., K) token ids; bias: optional (V,).
        mask: optional bool (...); masked positions return 0 and are not computed.

    Returns:
        float32 (..., K) log-probabilities.
    """
    _validate(hidden, weight, ids, 1, temperature, chunk_size, bias, mask)
    out = hidden.new_zeros(ids.shape, dtype=torch.float32)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1, ids.shape[-1]).long()
    flat_out = out.view(-1, ids.shape[-1])
    rows = torch.arange(flat_ids.shape[0], device=ids.device)
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    for s in range(0, rows.numel(), chunk_size):
        r = rows[s : s + chunk_size]
        z = _scaled_logits(flat_hidden[r], w32, b32, temperature)
        picked = z.gather(-1, flat_ids[r])
        lse, _ = _lse_and_entropy(z, with_entropy=False)
        flat_out[r] = picked - lse.unsqueeze(-1)
        del z  # free this chunk's logits before the next chunk's are allocated
    return out
