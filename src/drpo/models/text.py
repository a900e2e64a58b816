"""Text <-> token ids for prompts and responses: the one place the trainer, the rollout workers and
the evaluation turn text into ids and back.

    encode(prompt) = the prompt's ids (through the chat template when asked and the tokenizer has
                     one), checked against the longest prompt the run allows
    decode(ids, mask) = response texts, positions after EOS (mask 0) dropped, special tokens skipped
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from drpo.utils.config import ConfigError
from drpo.utils.errors import UserError


class Prompted(Protocol):
    """What :meth:`TextCodec.encode_example` reads of an example (``drpo.tasks.Example`` has it)."""

    prompt: str
    id: str
    source: str


class PromptError(UserError, ValueError):
    """A prompt the run cannot use: empty after tokenisation, or too long (:class:`PromptTooLong`)."""


class PromptTooLong(PromptError):
    """A prompt has more tokens than the run allows."""


class TextCodec:
    @classmethod
    def for_model(cls, tokenizer, model, *, chat_template: bool, max_prompt_tokens: Optional[int],
                  max_new_tokens: int) -> "TextCodec":
        """A codec whose prompt limit is ``max_prompt_tokens`` (task.max_prompt_tokens), checked against the
        model's positions; by default all the positions that ``max_new_tokens`` (rollout.max_new_tokens)
        leaves. Impossible limits are a ConfigError (a ValueError) naming the keys."""
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        limit, source = max_prompt_tokens, "task.max_prompt_tokens"
        if positions is not None:
            if max_new_tokens >= positions:
                raise ConfigError(f"rollout.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                                 f"{positions} positions")
            if limit is not None and limit + max_new_tokens > positions:
                raise ConfigError(f"task.max_prompt_tokens={limit} + rollout.max_new_tokens={max_new_tokens} exceeds "
                                 f"the model's {positions} positions (max_position_embeddings); lower "
                                 f"task.max_prompt_tokens to at most {positions - max_new_tokens}")
            if limit is None:
                limit, source = positions - max_new_tokens, "the model's positions minus rollout.max_new_tokens"
        return cls(tokenizer, chat_template=chat_template, max_prompt_tokens=limit, limit_source=source)

    def __init__(self, tokenizer, *, chat_template: bool = False, max_prompt_tokens: Optional[int] = None,
                 limit_source: str = "task.max_prompt_tokens") -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.max_prompt_tokens = max_prompt_tokens
        self.limit_source = limit_source  # where the limit comes from, for the error message

    def encode_example(self, example: Prompted) -> list[int]:
        """Token ids of ``example.prompt``; errors name its source (``data.jsonl line 7``) when it
        has one, else its id."""
        return self.encode(example.prompt, name=repr(example.id) if example.id else "", source=example.source)

    def encode(self, prompt: str, name: str = "", *, source: str = "") -> list[int]:
        """Token ids of ``prompt``; errors name it by ``source`` (where it was read, e.g.
        ``data.jsonl line 7``) when given, else by ``name`` (e.g. the example id), else by its start.
        Raises :class:`PromptTooLong` over the limit, :class:`PromptError` when it has no tokens."""
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        what = f"{source}: prompt" if source else f"prompt {name or repr(prompt[:40])}"
        if not ids:
            raise PromptError(f"{what} is empty after tokenisation")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"{what} has {len(ids)} tokens, over {self.limit_source}={self.max_prompt_tokens}; "
                                f"shorten or remove that {'row' if source else 'prompt'}, or raise the limit")
        return ids

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Response texts of a (N, R) batch; masked positions (after EOS) are dropped."""
        ids = response_ids.masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
