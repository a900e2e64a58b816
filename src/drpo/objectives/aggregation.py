"""Token -> scalar aggregation, with verl's semantics and global normalisation.

For a per-token loss L (B, T) and mask M:

    token-mean               sum(L M) / N_tok
    token-sum                sum(L M)
    seq-mean-token-sum       (1/N_seq) sum_i sum_t L M
    seq-mean-token-mean      (1/N_seq) sum_i (sum_t L M / sum_t M)
    seq-mean-token-sum-norm  (1/N_seq) sum_i sum_t L M / horizon      (horizon defaults to T)

N_tok / N_seq default to this batch's valid tokens / non-empty sequences. Pass the *global*
counts (over every micro-batch of the optimiser step, and every data-parallel rank) as
``global_token_count`` / ``global_seq_count``: then the losses of the micro-batches sum to the
loss of the full batch, and gradient accumulation equals one full-batch step exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg_mode: str = "token-mean",
    *,
    global_token_count: Optional[float] = None,
    global_seq_count: Optional[float] = None,
    horizon: Optional[float] = None,
) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss into a scalar (see the module docstring)."""
    if agg_mode not in AGG_MODES:
        raise ValueError(f"unknown agg_mode {agg_mode!r}; known: {list(AGG_MODES)}")
    for name, v in (("global_token_count", global_token_count), ("global_seq_count", global_seq_count),
                    ("horizon", horizon)):
        if v is not None and not float(v) > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    m = mask.to(loss_mat.dtype)
    masked = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))
    if agg_mode == "token-mean":
        n = m.sum() if global_token_count is None else global_token_count
        return masked.sum() / n
    if agg_mode == "token-sum":
        return masked.sum()
    tok_per_seq = m.sum(-1)
    n_seq = (tok_per_seq > 0).to(loss_mat.dtype).sum() if global_seq_count is None else global_seq_count
    if agg_mode == "seq-mean-token-mean":
        seq = masked.sum(-1) / tok_per_seq.clamp(min=1.0)
        return seq.sum() / n_seq
    seq = masked.sum(-1)
    loss = seq.sum() / n_seq
    if agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mat.shape[-1] if horizon is None else horizon)
    return loss
