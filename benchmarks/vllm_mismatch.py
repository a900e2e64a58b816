"""The real vLLM engine on this CPU: its costs, and the rollout/trainer mismatch it produces.

For each rollout precision (bf16, fp8 = e4m3 per-channel weights simulated, bf16 compute), a
VLLMEngine samples ``--prompts`` built-in arithmetic prompts x ``--n`` samples x up to ``--tokens``
tokens (the trainer's defaults: 16 x 8 x 16) from the model, and the trainer's float32 model
recomputes log pi of every sampled token (:func:`drpo.training.logprobs.response_logprobs`, same
temperature). The mismatch figures are the trainer's own (:func:`trust_region_metrics`):

    r = pi / mu,   mean |r - 1|,   [min r, max r],   mean / max |pi - mu| (probabilities),
    k3 = E_mu[r - 1 - log r]  (KL(mu || pi) estimate),   share of tokens with |pi - mu| > 0.15

The HF engine at the same precision (simulated on float32 hardware) is measured alongside.
Costs: vllm import, engine start, first generate (warm-up: vLLM compiles its log-prob rank kernel
with inductor; cached on disk afterwards), the median of ``--repeats`` generates, the median of
``--repeats`` weight syncs.

    .venv-vllm/bin/python benchmarks/vllm_mismatch.py --out benchmarks/results/vllm_mismatch.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from drpo.objectives.api import build_inputs
from drpo.objectives.metrics import trust_region_metrics
from drpo.rollout.engine import HFRolloutEngine, RolloutBatch, SamplingParams
from drpo.rollout.vllm_engine import VLLMEngine, import_vllm
from drpo.tasks.arithmetic import ArithmeticTask
from drpo.training.logprobs import response_logprobs
from drpo.training.models import load_policy

BOUNDARY = 0.15  # |pi - mu| beyond which DRPO's trust region acts


@torch.no_grad()
def mismatch(model, batches: list[RolloutBatch], temperature: float) -> dict[str, float]:
    """The trainer's mismatch metrics of the engine's mu against float32 pi, over ``batches``."""
    lp, blp, mask = [], [], []
    for b in batches:
        lp.append(response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask,
                                    temperature=temperature)[0].flatten())
        blp.append(b.behavior_log_prob.flatten())
        mask.append(b.response_mask.flatten().bool())
    lp, blp, mask = torch.cat(lp)[None], torch.cat(blp)[None], torch.cat(mask)[None]
    x = build_inputs(lp, blp, torch.zeros(1), mask)
    m = trust_region_metrics(x, torch.zeros_like(lp), None, BOUNDARY)
    return {
        "tokens": int(mask.sum()),
        "mean_abs_r_minus_1": (x.ratio - 1).abs()[mask].mean().item(),
        "ratio_min": m["ratio_min"], "ratio_max": m["ratio_max"],
        "mean_abs_pi_minus_mu": m["abs_shift_mean"], "max_abs_pi_minus_mu": m["abs_shift_max"],
        "kl_k3": m["kl_k3"], "frac_abs_pi_minus_mu_gt_0.15": m["beyond_pos_frac"] + m["beyond_neg_frac"],
    }


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin", help="'builtin' (the warm start) or a model folder")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    tokenizer, model = load_policy(args.model)
    torch.set_num_threads(args.threads)
    model.eval()
    examples = ArithmeticTask(seed=0).train_examples(args.prompts, rng=random.Random(0))
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.tokens, n=args.n)
    ids = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    _, t_import = timed(import_vllm)
    report: dict = {"args": vars(args), "vllm_import_s": t_import, "torch_threads": torch.get_num_threads()}
    print(f"vllm import {t_import:.1f} s; {args.prompts} prompts x {args.n} samples x <= {args.tokens} tokens, "
          f"T={args.temperature}, {args.threads} thread(s)")
    for i, precision in enumerate(args.precisions.split(",")):
        engine, t_start = timed(lambda: VLLMEngine(model, precision=precision, threads=args.threads, **ids))
        gen = torch.Generator().manual_seed(0)
        first, t_first = timed(lambda: engine.generate(prompts, params, gen))
        runs = [timed(lambda: engine.generate(prompts, params, gen)) for _ in range(args.repeats)]
        syncs = [timed(lambda: engine.sync(model))[1] for _ in range(args.repeats)]
        batches = [first] + [b for b, _ in runs]
        hf = HFRolloutEngine(model, precision=precision, **ids)
        hf_batches = [hf.generate(prompts, params, torch.Generator().manual_seed(s)) for s in range(len(batches))]
        row = {
            "engine_start_s": t_start, "engine_is_first_in_process": i == 0,
            "first_generate_s": t_first, "generate_s_median": statistics.median(t for _, t in runs),
            "generate_s_all": [t for _, t in runs], "sync_s_median": statistics.median(syncs),
            "vllm": mismatch(model, batches, args.temperature),
            "hf_engine": mismatch(model, hf_batches, args.temperature),
        }
        engine.close()
        report[precision] = row
        print(f"\n[{precision}] start {t_start:.1f} s ({'first' if i == 0 else 'second'} engine of the process), "
              f"first generate {t_first:.1f} s, generate median {row['generate_s_median']:.3f} s, "
              f"sync median {row['sync_s_median'] * 1e3:.1f} ms")
        for name in ("vllm", "hf_engine"):
            m = row[name]
            print(f"  {name:9s} tokens {m['tokens']:5d}  mean|r-1| {m['mean_abs_r_minus_1']:.5f}  "
                  f"r in [{m['ratio_min']:.4f}, {m['ratio_max']:.4f}]  |pi-mu| mean {m['mean_abs_pi_minus_mu']:.5f} "
                  f"max {m['max_abs_pi_minus_mu']:.4f}  k3 {m['kl_k3']:.2e}  "
                  f"|pi-mu|>{BOUNDARY} {m['frac_abs_pi_minus_mu_gt_0.15']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
