"""`drpo eval`: sample k answers per problem with the rollout engine and report avg@k / pass@k."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from drpo.evaluation.metrics import EvalResult, GenerateFn, evaluate
from drpo.rollout.engine import SamplingParams, decode_responses
from drpo.tasks.base import Example


def make_generate_fn(engine, tokenizer, encode: Callable[[str], list[int]], params: SamplingParams,
                     generator: Optional[torch.Generator] = None) -> GenerateFn:
    """Adapt a rollout engine to ``generate_fn(prompts, n) -> n completions per prompt``."""

    def generate(prompts: list[str], n: int) -> list[list[str]]:
        p = SamplingParams(**{**params.__dict__, "n": n})
        texts = decode_responses(engine.generate([encode(x) for x in prompts], p, generator), tokenizer)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    return generate


def encoder(tokenizer, chat_template: bool) -> Callable[[str], list[int]]:
    def encode(prompt: str) -> list[int]:
        if chat_template and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=True)
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]

    return encode


def load_examples(benchmark: str, *, question_field: str, answer_field: str, limit: Optional[int]) -> list[Example]:
    """'builtin' (the arithmetic held-out split), a shipped benchmark name, or a jsonl path."""
    from drpo.tasks.datasets import BENCHMARKS, load_benchmark, load_jsonl

    if benchmark == "builtin":
        from drpo.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask().heldout(limit or 256)
    if benchmark in BENCHMARKS:
        return load_benchmark(benchmark, limit=limit)
    if benchmark.endswith(".jsonl"):
        return load_jsonl(benchmark, question_field=question_field, answer_field=answer_field, limit=limit)
    raise ValueError(f"unknown benchmark {benchmark!r}; known: builtin, {', '.join(sorted(BENCHMARKS))}, "
                     "or a path ending in .jsonl")


def run_eval(*, model: str, benchmark: str, k: int, limit: Optional[int], temperature: float, top_p: float,
             max_new_tokens: int, precision: str, chat_template: bool, question_field: str, answer_field: str,
             seed: int) -> EvalResult:
    from drpo.rollout.engine import HFRolloutEngine
    from drpo.training.models import load_policy

    examples = load_examples(benchmark, question_field=question_field, answer_field=answer_field, limit=limit)
    tokenizer, net = load_policy(model)
    engine = HFRolloutEngine(net, precision=precision, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    gen = make_generate_fn(engine, tokenizer, encoder(tokenizer, chat_template), params,
                           torch.Generator().manual_seed(seed))
    return evaluate(gen, examples, k=k)
