"""log pi of the sampled response tokens under the trainer's model, without the full logits.

The sequence layout is the rollout engine's: [left-padded prompt | response]. Position p of the
concatenation predicts token p+1, so the hidden states at [P-1, P+R-1) score the R response tokens:

    log pi(y_t) = log_softmax(h_{P-1+t} W^T / T)[y_t]      (T = sampling temperature)

computed chunk by chunk by :func:`drpo.ops.logprob.chunked_logprobs` (never materialising the
N x V logits). Models whose head is not a plain linear map (logit soft-capping or scaling) fall
back to the full logits (:func:`drpo.ops.logprob.logprobs_from_logits`).

Shared prompts. A group's G responses share one prompt: run as N rows, the prompt's P tokens go through
the model G times, and with short responses (arithmetic: P ~ 30, R ~ 12) most of the forward and backward
is spent on copies. Given ``prompt_index`` (rows with the same index have the same prompt), each distinct
prompt runs once, its keys and values (a KV cache, with autograd) are repeated for its rows, and the
responses run on top of them:

    h_P, KV = decoder(prompt_u)                     u: the distinct prompts of the batch
    h_R     = decoder(response | KV[u(row)])        each row attends to its prompt's keys and values
    h       = [h_P[u(row), P - 1] ; h_R[:, :R - 1]]  the states that score response tokens 0 .. R - 1

The forward is the same function of the weights, so log pi and the gradients are those of the plain
forward up to float rounding (the sums run in another order); the gradient of a shared prompt's K/V is
the sum over its rows, which autograd does through the repeat. Dense models only: an MoE forward whose
expert choices are compared with or replayed from the engine's (per row and position) runs plainly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from drpo.models import is_moe
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
    prompt_index: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(log pi (N, R), entropy (N, R) or None, log pi at ``topk_ids`` (N, R, K) or None). With ``prompt_index``
    (N,), rows of one prompt share its forward (module docstring)."""
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
    if prompt_index is not None and not is_moe(model) and len(prompt_index.unique()) < len(prompt_index):
        h = shared_prompt_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index)
    else:
        h = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state[:, P - 1:P + R - 1]
    out = chunked_logprobs(h, head.weight, response_ids, temperature=temperature, chunk_size=chunk_size,
                           return_entropy=with_entropy, bias=head.bias, mask=mask)
    logp, ent = out if with_entropy else (out, None)
    tk = None
    if topk_ids is not None:
        with torch.no_grad():
            tk = topk_logprobs(h.detach(), head.weight.detach(), topk_ids, temperature=temperature,
                               chunk_size=chunk_size)
    return logp, ent, tk


def shared_prompt_hidden(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         response_ids: torch.Tensor, response_mask: torch.Tensor, prompt_index: torch.Tensor
                         ) -> torch.Tensor:
    """The decoder's hidden states (N, R, H) that score the R response tokens, each distinct prompt run once
    (module docstring). Rows with the same ``prompt_index`` must hold the same (left-padded) prompt."""
    from transformers import DynamicCache

    distinct, row_of = torch.unique(prompt_index, return_inverse=True)  # row_of: row -> its distinct prompt
    first = torch.empty(len(distinct), dtype=torch.long, device=row_of.device).scatter_(
        0, row_of, torch.arange(len(row_of), device=row_of.device))  # a row of each prompt (any: they are equal)
    if not torch.equal(prompt_ids[first][row_of], prompt_ids) or not torch.equal(prompt_mask[first][row_of], prompt_mask):
        raise ValueError("prompt_index: rows with the same index hold different prompts")
    decoder, p_mask = model.get_decoder(), prompt_mask[first]
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=prompt_ids[first], attention_mask=p_mask, position_ids=p_pos,
                  past_key_values=DynamicCache(config=model.config), use_cache=True)
    cache, last = out.past_key_values, out.last_hidden_state[:, -1]  # the prompt's last state scores token 0
    cache.batch_select_indices(row_of)  # each row's copy of its prompt's keys and values (autograd: summed back)
    r_pos = prompt_mask.sum(-1, keepdim=True) + torch.arange(response_ids.shape[1], device=prompt_mask.device)
    hidden = decoder(input_ids=response_ids, attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
                     position_ids=r_pos, past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([last[row_of, None], hidden[:, :-1]], dim=1)
