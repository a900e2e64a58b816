"""Optional vLLM rollout engine (needs the ``vllm`` package and a CUDA GPU).

Same interface as :class:`drpo.rollout.engine.HFRolloutEngine`: ``generate`` returns a
:class:`RolloutBatch` with vLLM's own log-probs as mu, ``sync`` pushes the trainer's weights.

* mu: vLLM is created with ``logprobs_mode="processed_logprobs"`` so the returned log-probs are
  those of the distribution it sampled from (after temperature / top-k / top-p), as the HF engine's.
* precision: ``bf16`` runs vLLM in bfloat16; ``fp8`` adds ``quantization="fp8"`` (dynamic per-channel
  FP8 weights, as vLLM serves FP8); ``fp32`` runs it in float32.
* weight sync: in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``model.load_weights`` on the
  engine's model, one colocated GPU.

Status: written against vLLM's public API (>= 0.10.2) but NOT exercised in this project's CI, which
has no GPU; the CPU path (HFRolloutEngine) is the tested default.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import torch
from torch import nn

from drpo.rollout.engine import RolloutBatch, SamplingParams, left_pad

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("rollout.engine='vllm' needs the vllm package (pip install vllm) and a CUDA GPU; "
                           "use rollout.engine='hf' (the default) elsewhere") from None
    if not torch.cuda.is_available():
        raise RuntimeError("rollout.engine='vllm' needs a CUDA GPU, and none is visible; "
                           "use rollout.engine='hf' (the default) on CPU")
    return vllm


class VLLMEngine:
    def __init__(self, model: nn.Module, *, precision: str, eos_id: int, pad_id: int,
                 gpu_memory_utilization: float = 0.4) -> None:
        vllm = _require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.eos_id, self.pad_id, self.precision = eos_id, pad_id, precision
        self._dir = tempfile.mkdtemp(prefix="drpo-vllm-")
        model.save_pretrained(self._dir)  # vLLM builds its model from a folder
        self.llm = vllm.LLM(model=self._dir, tokenizer=None, skip_tokenizer_init=True, dtype=_DTYPES[precision],
                            quantization="fp8" if precision == "fp8" else None,
                            gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="processed_logprobs",
                            enable_prefix_caching=False)

    def _vllm_model(self):
        engine = self.llm.llm_engine
        core = getattr(engine, "engine_core", None)
        worker = core.engine_core.model_executor.driver_worker if core is not None else engine.model_executor.driver_worker
        return worker.worker.model_runner.model if hasattr(worker, "worker") else worker.model_runner.model

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        self._vllm_model().load_weights(weights=((k, v) for k, v in model.state_dict().items()))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> RolloutBatch:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        sp = VSP(n=params.n, temperature=params.temperature, top_p=params.top_p,
                 top_k=params.top_k if params.top_k else -1, max_tokens=params.max_new_tokens,
                 logprobs=max(1, params.logprobs_topk), stop_token_ids=[self.eos_id], seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        rows, ids, lps, tk_lp, tk_id = [], [], [], [], []
        for i, o in enumerate(outs):
            for c in o.outputs:
                rows.append(i)
                toks = list(c.token_ids)
                ids.append(toks)
                lps.append([c.logprobs[t][tok].logprob for t, tok in enumerate(toks)])
                if params.logprobs_topk:
                    top = [sorted(d.items(), key=lambda kv: kv[1].rank)[:params.logprobs_topk] for d in c.logprobs]
                    tk_id.append([[k for k, _ in s] for s in top])
                    tk_lp.append([[v.logprob for _, v in s] for s in top])
        P_ids, P_mask = left_pad([prompts[r] for r in rows], self.pad_id)
        R = max(len(x) for x in ids)
        resp = torch.full((len(ids), R), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), R), dtype=torch.long)
        blp = torch.zeros((len(ids), R))
        for j, (t, lp) in enumerate(zip(ids, lps)):
            resp[j, :len(t)] = torch.tensor(t)
            mask[j, :len(t)] = 1
            blp[j, :len(t)] = torch.tensor(lp)
        topk_lp = topk_ids = None
        if params.logprobs_topk:
            K = params.logprobs_topk
            topk_lp = torch.zeros((len(ids), R, K))
            topk_ids = torch.zeros((len(ids), R, K), dtype=torch.long)
            for j in range(len(ids)):
                n = len(tk_id[j])
                topk_ids[j, :n] = torch.tensor(tk_id[j])
                topk_lp[j, :n] = torch.tensor(tk_lp[j])
        return RolloutBatch(P_ids, P_mask, resp, mask, blp, torch.tensor(rows), topk_lp, topk_ids)
