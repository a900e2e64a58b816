"""Group advantages from per-sample rewards (G samples per prompt, rows of a group adjacent).

    grpo:  A_i = R_i - mean_j R_j                    (the DRPO paper: mean-centred, no std division)
           A_i = (R_i - mean_j R_j) / (std_j R_j + eps)   with std_normalize=True (GRPO's original)
    rloo:  A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean_j R_j)

A group whose rewards are all equal has A = 0 for every sample: no learning signal. They are
counted, and ``keep`` marks the groups to train on when filtering them (DAPO dynamic sampling).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # (N,)
    keep: torch.Tensor        # (N,) bool: rows of groups with some reward spread
    zero_adv_groups: int
    groups: int

    @property
    def zero_adv_frac(self) -> float:
        return self.zero_adv_groups / max(self.groups, 1)


def group_advantages(rewards: torch.Tensor, group_size: int, method: str = "grpo",
                     std_normalize: bool = False, eps: float = 1e-6) -> GroupAdvantages:
    """Advantages for ``rewards`` (N,) made of consecutive groups of ``group_size``."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group advantages need group_size >= 2, got {group_size}")
    if method not in ("grpo", "rloo"):
        raise ValueError(f"unknown advantage method {method!r}; known: ['grpo', 'rloo']")
    R = rewards.float().view(-1, group_size)
    centred = R - R.mean(-1, keepdim=True)
    if method == "rloo":
        adv = centred * group_size / (group_size - 1)
    elif std_normalize:
        adv = centred / (R.std(-1, keepdim=True) + eps)
    else:
        adv = centred
    flat = (R.max(-1).values == R.min(-1).values)
    keep = (~flat)[:, None].expand_as(R).reshape(-1)
    return GroupAdvantages(adv.reshape(-1), keep, int(flat.sum()), R.shape[0])
