"""log pi of the sampled response tokens under the trainer's model, without the full logits.

The sequence layout is the rollout engine's: [left-padded prompt | response]. Position p of the
concatenation predicts token p+1, so the hidden states at [P-1, P+R-1) score the R response tokens:

    log pi(y_t) = log_softmax(h_{P-1+t} W^T / T)[y_t]      (T = sampling temperature)

computed chunk by chunk by :func:`drpo.ops.logprob.chunked_logprobs` (never materialising the
N x V logits). Models whose head is not a plain linear map (logit soft-capping or scaling) fall
back to the full logits (:func:`drpo.ops.logprob.logprobs_from_logits`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from drpo.ops.logprob import chunked_logprobs, logprobs_from_logits, topk_logprobs


def _plain_linear_head(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    special = any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    return not special and isinstance(model.get_output_embeddings(), nn.Linear)


def response_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    topk_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(log pi (N, R), entropy (N, R) or None, log pi at ``topk_ids`` (N, R, K) or None)."""
    P = prompt_ids.shape[1]
    R = response_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, response_mask], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = response_mask.bool()
    if not _plain_linear_head(model):  # generic fallback: the model's own logits, scored exactly
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:P + R - 1]
        return logprobs_from_logits(logits, response_ids, temperature=temperature, return_entropy=with_entropy,
                                    mask=mask, extra_ids=topk_ids)
    head = model.get_output_embeddings()
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    h = hidden[:, P - 1:P + R - 1]
    out = chunked_logprobs(h, head.weight, response_ids, temperature=temperature, chunk_size=chunk_size,
                           return_entropy=with_entropy, bias=head.bias, mask=mask)
    logp, ent = out if with_entropy else (out, None)
    tk = None
    if topk_ids is not None:
        with torch.no_grad():
            tk = topk_logprobs(h.detach(), head.weight.detach(), topk_ids, temperature=temperature,
                               chunk_size=chunk_size)
    return logp, ent, tk
