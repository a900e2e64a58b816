"""Keep freed memory in the process, so that each training step does not fault its tensors in again.

glibc's ``malloc`` serves a request above its mmap threshold (128 KiB, raised dynamically up to 32 MiB)
with a fresh ``mmap`` and returns it to the kernel on ``free``; it also gives back the top of its heap
once more than its trim threshold is free there. A CPU training step allocates and frees the same few
megabyte-sized tensors (activations, their gradients, the logits chunks) again and again; a tensor
above the threshold is then faulted in afresh at every step, and a page fault costs ~3 us on the
development machine (a virtual machine). Measured there with ``python benchmarks/e2e_vs_trl.py --side ours``
(1 thread; ``benchmarks/README.md``, "What moved it"): with micro-batches of 128 rows a step took ~24,500
page faults with glibc's defaults and ~1,600 with :func:`keep_freed_memory`, 1.29 -> 1.37 steps/s; with
the default micro-batches of 32 rows (length-ordered, compacted) ~9,700 against ~470, and a step time
within noise (1.65 vs 1.66 steps/s). It matters where tensors are larger (bigger models, vocabularies,
micro-batches).

:func:`keep_freed_memory` raises both thresholds to :data:`THRESHOLD_BYTES` with ``mallopt`` (what the
environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would set at start-up):
blocks up to that size come from the heap and freed memory stays there for the next step. The
price is that the process's resident memory stays at its peak instead of shrinking between steps, as a
GPU caching allocator's does. It changes how memory is obtained, never a computed number. A process-wide
setting like the thread count: the trainer and the rollout worker apply it; ``DRPO_KEEP_FREED_MEMORY=0``
leaves glibc's defaults. Where the C library has no ``mallopt`` (macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import os

THRESHOLD_BYTES = 1 << 30  # 1 GiB: every tensor of the built-in models' steps, and of a 1.5B model's logits chunk
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the policy above once per process; True when glibc's thresholds are now raised."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DRPO_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on (no search: find_library starts processes)
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        pass
    return _applied
