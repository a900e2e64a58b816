"""Group advantages from per-sample rewards (G samples per prompt, rows of a group adjacent),
behind a registry: ``train.advantage=<name>`` picks an estimator, users register their own.

    grpo:  A_i = R_i - mean_j R_j                    (the DRPO paper: mean-centred, no std division)
           A_i = (R_i - mean_j R_j) / (std_j R_j + eps)   with std_normalize=True (GRPO's original)
    rloo:  A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean_j R_j)

An estimator maps rewards R of shape (prompts, G) to advantages of the same shape::

    @register_advantage("my_adv")
    def my_adv(R: torch.Tensor, *, std_normalize: bool, eps: float) -> torch.Tensor: ...

A group whose rewards are all equal has A = 0 for every sample under both built-ins: no learning
signal. They are counted, and ``keep`` marks the groups to train on when filtering them (DAPO
dynamic sampling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drpo.utils.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator registering an estimator ``fn(R (P, G), *, std_normalize, eps) -> A (P, G)``."""
    return ADVANTAGES.register(name)


def get_advantage(name: str) -> AdvantageFn:
    """The registered estimator ``name`` (an unknown name: a ValueError listing the known ones)."""
    return ADVANTAGES[name]


@register_advantage("grpo")
def grpo(R: torch.Tensor, *, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    centred = R - R.mean(-1, keepdim=True)
    return centred / (R.std(-1, keepdim=True) + eps) if std_normalize else centred


@register_advantage("rloo")
def rloo(R: torch.Tensor, *, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    G = R.shape[-1]
    return (R - R.mean(-1, keepdim=True)) * G / (G - 1)


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
    R = rewards.float().view(-1, group_size)
    adv = get_advantage(method)(R, std_normalize=std_normalize, eps=eps)
    flat = (R.max(-1).values == R.min(-1).values)
    keep = (~flat)[:, None].expand_as(R).reshape(-1)
    return GroupAdvantages(adv.reshape(-1), keep, int(flat.sum()), R.shape[0])
