"""drpo.builtin: how the built-in models were made -- the arithmetic task's word-level tokenizer and
the supervised warm start (``drpo warmstart``). The models themselves ship as weights
(``drpo/data/models``; loaded by :func:`drpo.models.load_policy`)."""
from drpo.builtin.tokenizer import build_tokenizer
from drpo.builtin.warmstart import WarmStartHParams, warm_start

__all__ = ["build_tokenizer", "WarmStartHParams", "warm_start"]
