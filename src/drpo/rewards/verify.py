"""Rule-based math answer checking: the last ``\\boxed{}`` of a response against a gold answer.

Equivalence is decided by math-verify (integers, decimals, fractions, LaTeX expressions,
intervals, tuples, text). math-verify's own timeouts use ``signal.alarm``, which only works on
the main thread and cannot interrupt C-level big-integer arithmetic. So every check runs in a
pool of worker processes (see ``_verify_worker.py``): the caller waits at most ``timeout_s``
and kills the worker if it overruns. This makes :func:`verify` safe to call from any thread,
and adversarial answers (``9^{9^{9^{9}}}``, ``10^{10^{10}}!``) cost at most about
``timeout_s``. Workers are POSIX-only (``select`` on pipes).

Concurrency. A cheap check must not wait behind expensive ones, so:

* Trivial cases never reach a worker: an answer that equals the gold answer token for token
  after :func:`_normalise` (which only drops what cannot change an answer's meaning: outer
  and repeated whitespace, ``\\!``, ``$``, ``\\left``/``\\right``; ``\\dfrac`` is ``\\frac``) is
  True at once. A miss is never a fast False: it goes on to math-verify, which decides the rest.
* No fixed number of workers to queue for. A call that finds no idle worker waits for one
  to come free; if none has within ``SPAWN_AFTER_S`` (0.1 s: MATH-500's checks take 1 ms
  median, 0.09 s at most, so bursts of ordinary checks share a few workers), the workers are
  busy with slow checks, and the call has a worker of its own started, taking whichever is
  ready first: a freed one or its own (start-up about 0.3 s on an idle core). So a cheap check
  waits at most ``SPAWN_AFTER_S`` plus one start-up, whatever the number of expensive checks,
  as long as fewer than ``MAX_WORKERS`` workers (about 60 MB each) are alive; beyond that,
  calls wait for a worker to come free, which each busy worker's deadline bounds.
* More busy workers than cores share the cores: every check runs meanwhile, each still cut at
  its own deadline, so a burst of expensive checks is over within about ``timeout_s`` instead
  of queueing; an expensive check gets less CPU before its deadline, and a cheap check or a
  start-up takes longer in proportion (ordinary checks keep a wide margin under ``timeout_s``).
* Idle workers beyond ``KEEP_WORKERS`` are closed once idle for ``IDLE_CLOSE_S``, checked
  whenever a worker is put back, so a burst of concurrency does not hold memory for good.
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
MAX_WORKERS = 32  # worker processes at most (~60 MB each)
KEEP_WORKERS = min(os.cpu_count() or 1, 8)  # idle workers kept however long they sit idle
SPAWN_AFTER_S = 0.1  # wait for a busy worker this long, then start another (MATH-500 max: 0.09 s)
IDLE_CLOSE_S = 60.0  # an idle worker beyond KEEP_WORKERS is closed after this long unused
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


_PLAIN_INT = re.compile(r"[+-]?\d{1,300}")  # digits only (no separators, no decimal point)


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
        self.last_used = time.monotonic()

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
    """Ready workers, handed out one per concurrent call; at most ``size`` alive at once.

    A call that finds no idle worker waits for one to come free; after ``SPAWN_AFTER_S`` it
    also has a new one started, in a thread, and takes whichever is ready first: a worker that
    came free (its new one then joins the idle ones when ready) or its new one.
    """

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
        self.idle: list[_Worker] = []  # ready; most recently used last, handed out from the end
        self.alive = 0  # idle, busy and starting workers
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        worker = self._acquire()
        try:
            verdict = worker.check(pred, gold, timeout_s)
        except BaseException:
            self._discard(worker)
            raise
        if verdict is None:  # overran or died: kill it (and keep KEEP_WORKERS warming up)
            self._discard(worker)
            with self.lock:
                if self.alive < KEEP_WORKERS:
                    self._start(None)
        else:
            self._release(worker)
        return bool(verdict)

    def _acquire(self) -> _Worker:
        ticket = _Ticket()
        start_at = time.monotonic() + SPAWN_AFTER_S
        with self.changed:
            try:
                while not self.idle and ticket.worker is None:
                    if ticket.error is not None:
                        raise ticket.error
                    now = time.monotonic()
                    may_start = not ticket.started and self.alive < self.size
                    if may_start and (not self.alive or now >= start_at):
                        self._start(ticket)
                        continue
                    # Woken whenever a worker comes free, starts, fails or dies; the 1 s cap is
                    # only a safety net.
                    self.changed.wait(start_at - now if may_start else 1.0)
                return ticket.worker or self.idle.pop()
            finally:
                ticket.waiting = False

    def _start(self, ticket: _Ticket | None) -> None:
        """Start a worker in a thread (lock held); it goes to ``ticket`` if still waiting."""
        self.alive += 1
        if ticket is not None:
            ticket.started = True
        threading.Thread(target=self._start_worker, args=(ticket,), daemon=True).start()

    def _start_worker(self, ticket: _Ticket | None) -> None:
        try:
            worker = _Worker()
            worker.wait_ready()
        except Exception as error:  # noqa: BLE001 - handed to the call that asked for it
            with self.changed:
                self.alive -= 1
                if ticket is not None and ticket.waiting:
                    ticket.error = error
                self.changed.notify_all()
            return
        stale: list[_Worker] = []
        with self.changed:
            if ticket is not None and ticket.waiting:
                ticket.worker = worker
                self.changed.notify_all()
            else:
                stale = self._release_locked(worker)
        for w in stale:
            w.close()

    def _discard(self, worker: _Worker) -> None:
        worker.close()
        with self.changed:
            self.alive -= 1
            self.changed.notify_all()

    def _release(self, worker: _Worker) -> None:
        with self.changed:
            stale = self._release_locked(worker)
        for w in stale:
            w.close()

    def _release_locked(self, worker: _Worker) -> list[_Worker]:
        """Put ``worker`` back and take out (for closing) the workers beyond ``KEEP_WORKERS``
        that have sat idle for ``IDLE_CLOSE_S``."""
        now = time.monotonic()
        worker.last_used = now
        self.idle.append(worker)
        excess = len(self.idle) - KEEP_WORKERS
        stale = [w for w in self.idle if now - w.last_used > IDLE_CLOSE_S][: max(0, excess)]
        for w in stale:
            self.idle.remove(w)
        self.alive -= len(stale)
        self.changed.notify_all()
        return stale

    def close(self) -> None:
        with self.lock:
            for worker in self.idle:
                worker.close()
            self.alive -= len(self.idle)
            self.idle.clear()


class _Ticket:
    """One call's claim on the worker it had started, if it is still waiting for one."""

    def __init__(self) -> None:
        self.waiting = True
        self.started = False
        self.worker: _Worker | None = None
        self.error: Exception | None = None


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
    :func:`_normalise` is True without math-verify, and two plain integers (``25``, ``-3``, ``025``)
    are compared by value without it. Thread-safe; never hangs.
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
    p, g = _normalise(pred), _normalise(gold)
    if p == g:
        return True
    if _PLAIN_INT.fullmatch(p) and _PLAIN_INT.fullmatch(g):  # two plain integers: equal iff their values are
        return int(p) == int(g)
    return _get_pool().check(pred, gold, timeout_s)
