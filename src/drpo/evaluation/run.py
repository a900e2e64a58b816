"""`drpo eval`: sample k answers per problem with the rollout engine and report avg@k / pass@k."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from drpo.evaluation.config import EvalConfig
from drpo.evaluation.metrics import EvalResult, GenerateFn, evaluate
from drpo.models.text import TextCodec
from drpo.rollout.engine import RolloutBatch, SamplingParams
from drpo.tasks.base import Example
from drpo.utils.errors import InputError

# (prompt ids, sampling params) -> a rollout batch: an engine's ``generate`` with its random generator bound
GenerateIds = Callable[[list[list[int]], SamplingParams], RolloutBatch]


def make_generate_fn(generate_ids: GenerateIds, codec: TextCodec, params: SamplingParams) -> GenerateFn:
    """Adapt an engine's ``generate`` to ``generate_fn(prompts, n) -> n completions per prompt``."""

    def generate(prompts: list[str], n: int) -> list[list[str]]:
        p = SamplingParams(**{**params.__dict__, "n": n})
        batch = generate_ids([codec.encode(x) for x in prompts], p)
        texts = codec.decode(batch.response_ids, batch.response_mask)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    return generate


def heldout_metrics(generate_ids: GenerateIds, codec: TextCodec, examples: list[Example], cfg: EvalConfig,
                    reward_fn, *, max_new_tokens: int, reward_timeout: Optional[float]) -> dict[str, float]:
    """A trainer's held-out evaluation: avg@``cfg.samples`` of ``examples`` sampled by ``generate_ids`` (the
    deployed rollout engine, at its precision, with a fixed seed) at ``cfg.temperature``, all prompts in one
    engine call (the engine splits it by rollout.max_batch). Returns ``eval/accuracy`` and ``eval/length_mean``
    (characters of the decoded responses); ``max_new_tokens`` when ``cfg.max_new_tokens`` is unset."""
    if not examples:
        raise ValueError("no held-out prompts to evaluate on (set task.eval_path)")
    params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens or max_new_tokens)
    res = evaluate(make_generate_fn(generate_ids, codec, params), examples, k=cfg.samples, reward_fn=reward_fn,
                   batch_size=len(examples), progress=False, reward_timeout=reward_timeout)
    lengths = [len(r) for row in res.per_example for r in row["responses"]]
    return {"eval/accuracy": res.avg_at_k, "eval/length_mean": sum(lengths) / max(len(lengths), 1)}


def load_examples(benchmark: str, *, question_field: str, answer_field: str, limit: Optional[int]) -> list[Example]:
    """'builtin' (the arithmetic held-out split), a shipped benchmark name, or a jsonl path."""
    from drpo.tasks.datasets import BENCHMARKS, load_benchmark, load_jsonl

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or omitted for all problems), got {limit}")
    if benchmark == "builtin":
        from drpo.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask().heldout(limit or 256)
    if benchmark in BENCHMARKS:
        return load_benchmark(benchmark, limit=limit)
    if benchmark.endswith(".jsonl"):
        return load_jsonl(benchmark, question_field=question_field, answer_field=answer_field, limit=limit)
    raise InputError(f"unknown benchmark {benchmark!r}; known: builtin, {', '.join(sorted(BENCHMARKS))}, "
                     "or a path ending in .jsonl")


def run_eval(*, model: str, benchmark: str, k: int, limit: Optional[int], temperature: float, top_p: float,
             max_new_tokens: int, precision: str, chat_template: bool, question_field: str, answer_field: str,
             seed: int, progress: bool = True) -> EvalResult:
    from drpo.models.loading import load_policy
    from drpo.rollout.engine import HFRolloutEngine
    from drpo.rollout.precision import PRECISIONS

    if precision not in PRECISIONS:
        raise InputError(f"unknown rollout precision {precision!r}; known: {', '.join(PRECISIONS)}")
    examples = load_examples(benchmark, question_field=question_field, answer_field=answer_field, limit=limit)
    tokenizer, net = load_policy(model)
    engine = HFRolloutEngine(net, precision=precision, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    codec = TextCodec(tokenizer, chat_template=chat_template)
    rng = torch.Generator().manual_seed(seed)
    gen = make_generate_fn(lambda ids, p: engine.generate(ids, p, rng), codec, params)
    return evaluate(gen, examples, k=k, progress=progress)
