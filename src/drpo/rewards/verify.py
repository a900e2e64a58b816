"""Rule-based math answer checking: the last ``\\boxed{}`` of a response against a gold answer.

Equivalence is decided by math-verify (integers, decimals, fractions, LaTeX expressions,
intervals, tuples, text). math-verify's own timeouts use ``signal.alarm``, which only works on
the main thread and cannot interrupt C-level big-integer arithmetic. So every check runs in a
small pool of worker processes (see ``_verify_worker.py``): the caller waits at most
``timeout_s`` and kills the worker if it overruns. This makes :func:`verify` safe to call from
any thread, and adversarial answers (``9^{9^{9^{9}}}``, ``10^{10^{10}}!``) cost at most about
``timeout_s``. Workers are POSIX-only (``select`` on pipes).

Trivial cases never reach a worker: an answer that equals the gold answer token for token
after :func:`_normalise` (which only drops what cannot change an answer's meaning: outer and
repeated whitespace, ``\\!``, ``$``, ``\\left``/``\\right``; ``\\dfrac`` is ``\\frac``) is True
at once. A miss is never a fast False: it goes on to math-verify, which decides the rest.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

MAX_ANSWER_CHARS = 1000  # longest boxed answer worth parsing; MATH-500's longest gold is 53
MAX_WORKERS = min(os.cpu_count() or 1, 8)  # concurrent checks; each worker holds ~60 MB
STARTUP_TIMEOUT_S = 120.0  # one-off import of math-verify in a fresh worker (not the input's fault)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_WORKER_SOURCE = (Path(__file__).parent / "_verify_worker.py").read_text()


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Escaped braces (``\\{``, ``\\}``) do not count. Returns None when there is no such command
    or when the last one is never closed (e.g. a truncated response). Runs in linear time.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    start = None
    for match in _BOXED.finditer(text):
        start = match.end()
    if start is None:
        return None
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


_TOKEN = re.compile(r"\\(?:[A-Za-z]+|.)|\s+|.", re.DOTALL)  # control word or symbol, spaces, char
_DELIMITERS = {"(", ")", "[", "]", "|", "\\{", "\\}", "\\|", "\\langle", "\\rangle"}


def _normalise(answer: str) -> str:
    """``answer`` less what cannot change its meaning, for the trivial-match fast path.

    Works on LaTeX tokens, so that ``\\{`` or ``\\\\`` are never split. Strips the ends; writes
    each run of whitespace as one space (whitespace is kept: math-verify reads ``58, 500`` as a
    pair but ``58,500`` as a number, and fails on ``\\left (``); drops ``\\!``, unescaped ``$``
    and a ``\\left``/``\\right`` directly before a delimiter; spells ``\\dfrac``/``\\tfrac`` as
    ``\\frac``. A control word is never run into a following letter (``\\pi\\!r`` gives
    ``\\pi r``). Two answers equal after this are the same answer; unequal ones may still be
    equivalent (math-verify decides those).
    """
    tokens = _TOKEN.findall(answer.strip())
    out: list[str] = []
    for i, token in enumerate(tokens):
        if token.isspace():
            if out and out[-1] != " ":
                out.append(" ")
            continue
        if token in ("\\!", "$"):
            continue
        if token in ("\\left", "\\right") and i + 1 < len(tokens) and tokens[i + 1] in _DELIMITERS:
            continue
        if out and _is_control_word(out[-1]) and token[0].isalpha():
            out.append(" ")
        out.append("\\frac" if token in ("\\dfrac", "\\tfrac") else token)
    return "".join(out).strip()


def _is_control_word(token: str) -> bool:
    return token.startswith("\\") and token[1:].isalpha()


def _read_line(fd: int, deadline: float) -> str | None:
    """One newline-terminated line from ``fd``, or None at the deadline or end of file."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    return data.decode()


class _Worker:
    """One math-verify child process, spoken to over its stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        self.ready = False

    def wait_ready(self) -> None:
        """Block until the worker has imported math-verify; raise if it cannot."""
        if not self.ready:
            if _read_line(self.proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S) is None:
                self.close()
                raise RuntimeError(
                    f"math-verify worker failed to start (exit code {self.proc.returncode}); "
                    "its traceback, if any, is on stderr"
                )
            self.ready = True

    def check(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """math-verify's verdict, or None if the worker died or overran ``timeout_s``."""
        self.wait_ready()
        # Soft limit inside the worker (math-verify's signals, whole seconds, per step) so that
        # ordinary slow sympy work ends without a restart; the hard limit is the deadline below.
        request = {"pred": pred, "gold": gold, "timeout": max(1, int(timeout_s / 2))}
        deadline = time.monotonic() + timeout_s
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
        except BrokenPipeError:
            return None
        line = _read_line(self.proc.stdout.fileno(), deadline)
        return None if line is None else bool(json.loads(line)["ok"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class _Pool:
    """Idle workers handed out one per concurrent call; at most ``size`` exist at once."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(size)

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self.slots:
            with self.lock:
                worker = self.idle.pop() if self.idle else _Worker()
            verdict = worker.check(pred, gold, timeout_s)
            if verdict is None:  # overran or died: kill it, and start a replacement warming up
                worker.close()
                worker = _Worker()
            with self.lock:
                self.idle.append(worker)
            return bool(verdict)

    def close(self) -> None:
        with self.lock:
            for worker in self.idle:
                worker.close()
            self.idle.clear()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    """The process-wide pool, created on first use (and anew in a forked child)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = _Pool(size=MAX_WORKERS)
        return _pool


@atexit.register
def _close_pool() -> None:
    if _pool is not None and _pool.pid == os.getpid():
        _pool.close()


def verify(response: str, gold: str, *, timeout_s: float = 5.0) -> bool:
    """True when the last ``\\boxed{}`` answer of ``response`` is equivalent to ``gold``.

    No boxed answer, an unclosed one, one longer than ``MAX_ANSWER_CHARS``, or a check that
    takes longer than ``timeout_s`` seconds gives False. An answer equal to ``gold`` after
    :func:`_normalise` is True without math-verify. Thread-safe; never hangs.
    """
    if not isinstance(response, str):
        raise ValueError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(gold, str):
        raise ValueError(f"gold must be a str, got {type(gold).__name__}")
    if not gold.strip():
        raise ValueError("gold answer is empty")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    pred = extract_boxed(response)
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    if _normalise(pred) == _normalise(gold):
        return True
    return _get_pool().check(pred, gold, timeout_s)
