"""The rollout/trainer mismatch of a model, per rollout engine and precision, per mu bucket.

For each engine spec (``hf:fp32``, ``hf:bf16``, ``hf:fp8``, ``hf:fp4``, ``hf:int4``: drpo's HF engine, low
precision simulated by rounding on float32 hardware; ``vllm:bf16``: the real vLLM engine on this CPU,
real bf16 kernels), the engine samples ``--prompts`` prompts x ``--n`` samples x up to ``--tokens`` new
tokens at temperature ``--temperature`` from the float32 weights of ``--model``, and the trainer's float32
model recomputes log pi of every sampled token (the trainer's own function). Per sampled token, with
mu the engine's probability and pi the trainer's:

    r = pi / mu,   mean |r - 1|,   k3 = mean(r - 1 - log r)   (an estimate of KL(mu || pi)),
    mean and max |pi - mu|,   the share of tokens with mu < 0.01,

over all tokens and per mu bucket (drpo.objectives.metrics.MU_BUCKETS). Prompts: the arithmetic task's
(``--task builtin``, the model's own tokenizer, no chat template unless ``--chat-template``) or the shipped
GSM8K test questions with the chat template and the step-by-step instruction (``--task gsm8k``).

    .venv-vllm/bin/python benchmarks/mismatch_table.py --model smollm2-135m --task gsm8k --tokens 128 \\
        --out benchmarks/results/mismatch_smollm2.json
    .venv-vllm/bin/python benchmarks/mismatch_table.py --model builtin --out benchmarks/results/mismatch_builtin.json

``vllm:*`` specs need the vLLM venv (``make setup-vllm``); the ``hf:*`` ones run in either.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from drpo.models import TextCodec, load_policy
from drpo.objectives.metrics import MU_BUCKETS
from drpo.rollout.engine import HFRolloutEngine, RolloutBatch, SamplingParams
from drpo.tasks.arithmetic import ArithmeticTask
from drpo.tasks.datasets import load_benchmark
from drpo.training.logprobs import response_logprobs


def prompts_for(task: str, n: int, codec: TextCodec) -> list[list[int]]:
    """Token ids of ``n`` prompts of ``task`` (the same prompts for every engine)."""
    if task == "builtin":
        examples = ArithmeticTask(seed=0).train_examples(n, rng=random.Random(0))
    else:
        examples = load_benchmark(task)[:n]
    return [codec.encode_example(e) for e in examples]


def fp32_head_(engine: HFRolloutEngine, model) -> None:
    """The engine's LM head computed in float32 from the trainer's float32 weight (untied from the engine's
    rounded embedding), the rest as the engine's precision has it: MiniMax-M1's fix (arXiv 2506.13585, 3.2)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    head.weight = torch.nn.Parameter(model.get_output_embeddings().weight.detach().clone(), requires_grad=False)
    engine.model.set_output_embeddings(head)


def make_engine(spec: str, model, eos_id: int, pad_id: int, threads: int):
    """``hf:<precision>`` or ``vllm:<precision>``; ``hf:<precision>+fp32head``: the HF engine with its LM head
    in float32 (:func:`fp32_head_`), to see how much of the mismatch the head's rounding makes."""
    kind, precision = spec.split(":")
    if kind == "hf":
        precision, _, variant = precision.partition("+")
        engine = HFRolloutEngine(model, precision=precision, eos_id=eos_id, pad_id=pad_id)
        if variant == "fp32head":
            fp32_head_(engine, model)
        elif variant:
            raise ValueError(f"unknown engine variant {variant!r} in {spec!r}")
        return engine
    from drpo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model, precision=precision, eos_id=eos_id, pad_id=pad_id, threads=threads)


@torch.no_grad()
def token_figures(model, batches: list[RolloutBatch], temperature: float) -> dict:
    """The mismatch figures (module docstring) of the sampled tokens of ``batches``."""
    logp, mu_logp = [], []
    for b in batches:
        lp = response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask,
                               temperature=temperature)[0]
        m = b.response_mask.bool()
        logp.append(lp[m].double())
        mu_logp.append(b.behavior_log_prob[m].double())
    logp, mu_logp = torch.cat(logp), torch.cat(mu_logp)
    pi, mu, log_r = logp.exp(), mu_logp.exp(), logp - mu_logp
    r = log_r.exp()

    def figures(sel: torch.Tensor) -> dict:
        if not sel.any():
            return {"tokens": 0}
        return {"tokens": int(sel.sum()), "token_frac": float(sel.double().mean()),
                "mean_abs_r_minus_1": float((r[sel] - 1).abs().mean()),
                "k3": float((r[sel] - 1 - log_r[sel]).mean()),
                "mean_abs_pi_minus_mu": float((pi[sel] - mu[sel]).abs().mean()),
                "max_abs_pi_minus_mu": float((pi[sel] - mu[sel]).abs().max()),
                "r_min": float(r[sel].min()), "r_max": float(r[sel].max())}

    out = figures(torch.ones_like(mu, dtype=torch.bool))
    out["mu_lt_0.01_frac"] = float((mu < 0.01).double().mean())
    out["buckets"] = {name: figures((mu >= lo) & (mu < hi)) for name, lo, hi in MU_BUCKETS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--task", default="builtin", choices=["builtin", "gsm8k", "math500"])
    ap.add_argument("--chat-template", action="store_true", help="for --task builtin (gsm8k/math500 always use it)")
    ap.add_argument("--engines", default="hf:fp32,hf:bf16,hf:fp8,hf:fp4,hf:int4,vllm:bf16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--tokens", type=int, default=16, help="max new tokens")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2, help="generate calls per engine (different seeds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer, model = load_policy(args.model)
    model.eval()
    codec = TextCodec.for_model(tokenizer, model, chat_template=args.chat_template or args.task != "builtin",
                                max_prompt_tokens=None, max_new_tokens=args.tokens)
    prompts = prompts_for(args.task, args.prompts, codec)
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.tokens, n=args.n)
    report: dict = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "date": time.strftime("%Y-%m-%d"), "engines": {}}
    head = f"{'engine':10s} {'tokens':>6s} {'mean|r-1|':>10s} {'k3':>9s} {'mean|pi-mu|':>11s} {'max|pi-mu|':>10s} {'mu<0.01':>8s}"
    print(f"{args.model} on {args.task}: {args.prompts} prompts x {args.n} x <= {args.tokens} tokens, "
          f"T={args.temperature}\n{head}")
    for spec in args.engines.split(","):
        t0 = time.perf_counter()
        engine = make_engine(spec, model, tokenizer.eos_token_id, tokenizer.pad_token_id, args.threads)
        batches = [engine.generate(prompts, params, torch.Generator().manual_seed(s)) for s in range(args.repeats)]
        if hasattr(engine, "close"):
            engine.close()
        row = token_figures(model, batches, args.temperature)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report["engines"][spec] = row
        print(f"{spec:10s} {row['tokens']:6d} {row['mean_abs_r_minus_1']:10.5f} {row['k3']:9.2e} "
              f"{row['mean_abs_pi_minus_mu']:11.5f} {row['max_abs_pi_minus_mu']:10.4f} {row['mu_lt_0.01_frac']:8.3f}",
              flush=True)
        for name, b in row["buckets"].items():
            if b["tokens"]:
                print(f"  {name:9s} {b['tokens']:6d} {b['mean_abs_r_minus_1']:10.5f} {b['k3']:9.2e} "
                      f"{b['mean_abs_pi_minus_mu']:11.5f} {b['max_abs_pi_minus_mu']:10.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
