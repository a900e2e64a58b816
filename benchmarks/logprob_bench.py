"""Peak memory and wall time of sampled-token log-probs from the LM head, forward + backward.

    python benchmarks/logprob_bench.py --out benchmarks/results/logprob_cpu.json
    python benchmarks/logprob_bench.py --quick     # 1,024 tokens, 32,768 vocab, 512 hidden, chunks of 256
    python benchmarks/logprob_bench.py --device cuda --dtype bfloat16

Each variant computes loss = sum_i g_i log p(t_i) from hidden (N x H) and weight (V x H) and
backpropagates to both. Variants: ``naive`` (full logits + log_softmax, drpo.ops.naive_logprobs),
``chunked`` (drpo.ops.chunked_logprobs), ``trl_chunked`` (trl.kernels.ChunkedLogProbFunction,
vocabulary tiles), ``trl_selective`` (full logits + trl's selective_log_softmax) and
``liger_flce`` (Liger's fused linear cross-entropy, CUDA only); the optional ones are skipped
when not importable.

Memory. Every variant runs in a fresh subprocess. On CPU the peak is the process's maximum
resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``): it counts every page torch touched,
and torch's CPU allocator does not cache, so freed logits leave the RSS. We report the peak and
the peak minus the RSS just before the first forward (inputs already allocated): the memory
the operation adds, including the (V x H) weight gradient it must return. (``tracemalloc``
does not see torch's allocations.) On CUDA the peak is ``torch.cuda.max_memory_allocated``.
The first forward + backward is the memory run; the timed repetitions follow it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("naive", "chunked", "trl_chunked", "trl_selective", "liger_flce")


def current_rss_bytes() -> int:
    """Resident set size now, from /proc/self/statm (pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_logprob_fn(variant: str, chunk_size: int, temperature: float):
    """(hidden, weight, targets) -> log p(targets), or None when the variant is not importable."""
    import torch

    if variant == "naive":
        from drpo.ops.logprob import naive_logprobs

        return lambda h, w, t: naive_logprobs(h, w, t, temperature=temperature)
    if variant == "chunked":
        from drpo.ops.logprob import chunked_logprobs

        return lambda h, w, t: chunked_logprobs(
            h, w, t, temperature=temperature, chunk_size=chunk_size
        )
    if variant == "trl_chunked":
        try:
            from trl.kernels import ChunkedLogProbFunction
        except ImportError:
            return None
        # trl tiles the vocabulary (32,768 columns, its default) and 4,096 tokens at a time
        return lambda h, w, t: ChunkedLogProbFunction.apply(
            h, w, None, t, temperature, 32768, None, 1.0, ()
        )[0]
    if variant == "trl_selective":
        try:
            from trl.trainer.utils import selective_log_softmax
        except ImportError:
            return None
        return lambda h, w, t: selective_log_softmax(h.float() @ w.float().T, t, temperature)
    if variant == "liger_flce":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            return None
        if not torch.cuda.is_available():
            return None
        # per-token cross-entropy = -log p(target); Liger has no temperature argument
        if temperature != 1.0:
            return None
        return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    raise ValueError(f"unknown variant {variant!r}")


def worker(args: argparse.Namespace) -> dict:
    """Run one variant in this (fresh) process: one memory run, then ``reps`` timed runs."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    fn = make_logprob_fn(args.worker, args.chunk_size, args.temperature)
    if fn is None:
        return {"variant": args.worker, "skipped": "not importable or not supported here"}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    grad_out = torch.randn(args.tokens, generator=g).to(device)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step() -> float:
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (fn(hidden, weight, targets).float() * grad_out).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    result = {"variant": args.worker}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first = step()
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_bytes=peak, base_bytes=base, extra_bytes=peak - base)
    else:
        base, maxrss_before = current_rss_bytes(), max_rss_bytes()
        first = step()
        peak = max_rss_bytes()
        result.update(
            peak_bytes=peak,
            base_bytes=base,
            extra_bytes=peak - base,
            peak_hidden_by_setup=peak <= maxrss_before,
        )
    result["first_s"] = first
    result["times_s"] = [step() for _ in range(args.reps)]
    result["median_s"] = statistics.median(result["times_s"])
    return result


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Launch a fresh interpreter for one variant and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", variant] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("vocab", "hidden", "tokens", "chunk_size", "reps", "device", "dtype",
                 "temperature", "threads")
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    naive = next((r for r in results if r["variant"] == "naive" and "median_s" in r), None)
    print(f"{'variant':<14}{'peak MiB':>10}{'extra MiB':>11}{'x naive':>9}"
          f"{'median s':>10}{'x naive':>9}  times s")
    for r in results:
        if "median_s" not in r:
            print(f"{r['variant']:<14}  {r.get('skipped') or r.get('error')}")
            continue
        mem_ratio = r["extra_bytes"] / naive["extra_bytes"] if naive else float("nan")
        time_ratio = r["median_s"] / naive["median_s"] if naive else float("nan")
        times = " ".join(f"{t:.2f}" for t in [r["first_s"], *r["times_s"]])
        print(f"{r['variant']:<14}{r['peak_bytes'] / 2**20:>10.0f}{r['extra_bytes'] / 2**20:>11.0f}"
              f"{mem_ratio:>9.3f}{r['median_s']:>10.2f}{time_ratio:>9.3f}  {times} (first=memory run)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3, help="timed runs after the memory run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true",
                   help="1,024 tokens, 32,768 vocab, 512 hidden, chunks of 256 tokens")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.vocab, args.hidden, args.tokens, args.chunk_size = 32768, 512, 1024, 256
    import torch

    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    print(json.dumps({"config": config, "machine": machine}))
    results = []
    for variant in args.variants.split(","):
        results.append(run_variant(variant, args))
        print(json.dumps(results[-1]), flush=True)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config["variants"] = args.variants
        args.out.write_text(json.dumps(
            {"config": config, "machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
