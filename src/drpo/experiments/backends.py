"""Where ``drpo compare`` runs its runs: a process pool on this machine, or tasks on a Ray cluster.

A backend takes runs, tells when they end, and stops them all on Ctrl-C; the grid's bookkeeping (the
manifest, the progress bar, the lock, skip and resume) stays in :mod:`drpo.experiments.compare`.

    local   each run a fresh process (``spawn``) on this machine, ``--workers N`` at once (default 1)
    ray     each run a Ray task in a fresh worker process (a worker runs one task, then exits), with its
            resource request (:func:`resources`); Ray places the tasks on the cluster's nodes, at most
            ``--workers N`` at once if given, else as many as the cluster's resources hold

Both run :func:`drpo.experiments.runner.execute` on the run, so a run's numbers do not depend on the
backend. With Ray, ``--out`` must be a folder every node reaches at the same path (a shared
filesystem): the workers write the runs there and the driver reads their states from it.

Faults, with Ray:

* a worker process that dies (the OOM killer, a lost node) -- Ray runs the task again, up to
  :data:`RAY_RETRIES` more times, and each try plans the run afresh: it resumes from the checkpoint the
  dead worker left. A run whose worker dies in every try is recorded as ``failed`` (cause
  ``worker_lost``) in its status file; the grid goes on, and the next ``drpo compare`` tries it again.
* the driver killed -- Ray ends its tasks; the runs keep their checkpoints and the next ``drpo compare``
  resumes them (a task waits, up to :data:`LOCK_WAIT_S`, for a run folder still held by a dying worker).
* Ctrl-C or SIGTERM on the driver -- queued tasks are cancelled; ``ray.cancel`` reaches a running task as
  SIGINT, which the task turns into the SIGTERM the local pool sends: the run stops after its current
  step, with a checkpoint (status ``interrupted``).
"""
from __future__ import annotations

import fcntl
import math
import signal
import sys
import time
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Optional, Protocol

from drpo.experiments.grids import Run
from drpo.training import run_io
from drpo.training.config import RunConfig
from drpo.utils.errors import InputError

BACKENDS = ("local", "ray")
RAY_RETRIES = 3      # Ray's default: a task whose worker died runs again up to 3 more times
LOCK_WAIT_S = 300.0  # how long a Ray task waits for a run folder another (dying) process still holds


class Backend(Protocol):
    slots: float  # how many runs at once (math.inf: as many as the cluster's resources hold)

    def start(self, run: Run, out: Path, action: str) -> None:
        """Start ``run`` (``action``: runner.plan's 'start', 'restart' or 'resume')."""

    def wait(self) -> list[str]:
        """Block until one or more started runs are over; their slugs."""

    def stop(self) -> int:
        """Cancel the queued runs and stop those in flight after their current step (waits for them);
        returns how many were in flight."""

    def close(self) -> None:
        """Release the backend (after :meth:`stop`, or when every run is over)."""


def check_backend(backend: str, address: Optional[str]) -> None:
    """Raise ValueError for a backend that cannot run here (checked before anything runs)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown --backend {backend!r}: use {' or '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise InputError("--address is the Ray cluster's address: it goes with --backend ray")
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise InputError("--backend ray needs Ray, which is not installed here: pip install 'drpo[ray]'")


def make_backend(backend: str, workers: Optional[int] = None, address: Optional[str] = None) -> Backend:
    """The backend named (:data:`BACKENDS`); ``workers``: runs at once (None: the backend's default)."""
    check_backend(backend, address)
    return LocalPool(workers or 1) if backend == "local" else RayPool(workers, address)


def resources(cfg: RunConfig) -> dict[str, float]:
    """A run's Ray resource request: a CPU per torch thread of each of its processes (the trainer, and the
    rollout worker when rollout.staleness >= 1; ``threads`` unset counts as 1), and a GPU with device=cuda."""
    processes = 2 if cfg.rollout.staleness else 1
    return {"num_cpus": (cfg.threads or 1) * processes,
            "num_gpus": 1 if cfg.device.startswith("cuda") else 0}


def unplaceable(request: dict[str, float], nodes: list[dict]) -> bool:
    """Whether no live node (``ray.nodes()``) has the resources of ``request`` (:func:`resources`): Ray keeps
    such a task queued until a node that has them joins (an autoscaling cluster may add one)."""
    need = {"CPU": request["num_cpus"], "GPU": request["num_gpus"]}
    return not any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items() if v)
                   for n in nodes if n.get("Alive"))


# ---------------------------------------------------------------------------- local
def _local_main(run: Run, out: Path, action: str) -> None:
    from drpo.experiments.runner import execute

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the grid's: it stops this run with SIGTERM
    execute(run, out, action)


class LocalPool:
    """Each run a fresh process (``spawn``) on this machine, ``workers`` at once."""

    def __init__(self, workers: int = 1) -> None:
        self.slots = workers
        self._ctx = get_context("spawn")
        self._procs: dict[str, Any] = {}

    def start(self, run: Run, out: Path, action: str) -> None:
        p = self._ctx.Process(target=_local_main, args=(run, out, action), name=f"drpo-run {run.slug}")
        p.start()
        self._procs[run.slug] = p

    def wait(self) -> list[str]:
        wait([p.sentinel for p in self._procs.values()])
        done = [s for s, p in self._procs.items() if not p.is_alive()]
        for slug in done:
            self._procs.pop(slug).join()
        return done

    def stop(self) -> int:
        for p in self._procs.values():
            p.terminate()  # SIGTERM: the run stops after its current step, with a checkpoint
        for p in self._procs.values():
            p.join(timeout=600)
        n, self._procs = len(self._procs), {}
        return n

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- Ray
def _stop_now(signum, frame) -> None:
    """SIGTERM before the trainer's loop (set-up, waiting for the folder): there is no step to finish."""
    raise KeyboardInterrupt


def _as_sigterm(signum, frame) -> None:
    """``ray.cancel`` interrupts a running task with SIGINT's handler: pass it on as the SIGTERM the local
    pool sends, to the handler in place (the trainer's loop: stop after the current step, with a checkpoint)."""
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signal.SIGTERM, frame)


def _folder_free(run_dir: Path, timeout: float) -> bool:
    """Wait until no process holds ``run_dir``'s lock (run_io.RunLock), e.g. a worker of a killed driver that
    Ray has not ended yet; False if one still does after ``timeout`` seconds. Leaves the lock file as it is."""
    lock = run_dir / ".lock"
    t0 = time.monotonic()
    while lock.exists():
        with open(lock, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if time.monotonic() - t0 > timeout:
                    return False
                time.sleep(0.2)
                continue
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return True
    return True


def run_task(run: Run, out: str) -> str:
    """A run, in a Ray worker (which runs this one task and exits: a fresh process, as the local pool's).
    Plans the run again first, so that a try after a dead worker resumes from the checkpoint it left.
    Returns the run's state from its status file."""
    from drpo.experiments.runner import MANIFEST, execute, plan

    grid_dir = Path(out)
    if not (grid_dir / MANIFEST).exists():  # the driver wrote it before it started any run
        import socket

        raise FileNotFoundError(f"the grid folder {grid_dir} is not on node {socket.gethostname()} (no "
                                f"{MANIFEST}): with --backend ray, --out must be a folder every node reaches at "
                                "the same path (a shared filesystem)")
    signal.signal(signal.SIGTERM, _stop_now)  # the trainer's loop puts its own in place while it runs
    signal.signal(signal.SIGINT, _as_sigterm)
    try:
        if not _folder_free(grid_dir / run.slug, LOCK_WAIT_S):
            return "locked"
        action = plan(run, grid_dir)
        if action != "skip":
            execute(run, grid_dir, action)
    except KeyboardInterrupt:  # stopped before the trainer's loop began
        pass
    return run_io.read_status(grid_dir / run.slug).get("state", "pending")


def _record_lost(run_dir: Path, error: BaseException) -> None:
    """A run whose Ray task gave up (its worker died in every try; or the task itself raised): say so in its
    status file, where the manifest and the report read states (the next drpo compare tries it again)."""
    from drpo.experiments.results import ended

    import ray.exceptions

    status = run_io.read_status(run_dir)
    if ended(status):
        return  # it has its result; the worker was lost afterwards
    if isinstance(error, ray.exceptions.RayTaskError):  # raised by run_task itself (not retried: it would again)
        raised = error.cause if error.cause is not None else error
        cause, reason = "exception", f"its Ray task raised {type(raised).__name__}: {' '.join(str(raised).split())}"
    else:
        cause = "worker_lost"
        first = str(error).strip().splitlines()
        reason = (f"its Ray worker was lost in each of {RAY_RETRIES + 1} tries; the last: {type(error).__name__}"
                  + (f" ({first[0][:200]})" if first else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    run_io.write_status(run_dir, "failed", step=status.get("step", 0), cause=cause, reason=reason)


class RayPool:
    """Each run a Ray task (:func:`run_task`) with its resource request (:func:`resources`)."""

    def __init__(self, workers: Optional[int] = None, address: Optional[str] = None) -> None:
        import ray

        self.ray = ray
        self.slots = workers or math.inf
        previous = signal.getsignal(signal.SIGTERM)  # ray.init puts in its own (exit at once): the grid's rules
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except ConnectionError as e:
            raise ValueError(f"--backend ray: cannot reach the Ray cluster"
                             + (f" at --address {address}" if address else "") + f": {e}") from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        self._task = ray.remote(max_calls=1)(run_task)
        self._refs: dict[Any, tuple[str, Path]] = {}  # ObjectRef -> (slug, grid folder)
        self._nodes = ray.nodes()
        self._warned: set[tuple] = set()

    def start(self, run: Run, out: Path, action: str) -> None:
        from drpo.experiments.runner import run_config

        out = Path(out).resolve()  # the workers' working folder is not the driver's
        request = resources(run_config(run, out))
        if unplaceable(request, self._nodes) and tuple(request.items()) not in self._warned:
            self._warned.add(tuple(request.items()))
            print(f"warning: run {run.slug} asks for {request['num_cpus']} CPU(s)"
                  + (f" and {request['num_gpus']} GPU" if request["num_gpus"] else "") + "; no node of the cluster "
                  "has that now: it waits in Ray's queue until one joins", file=sys.stderr)
        ref = self._task.options(**request, max_retries=RAY_RETRIES, name=f"drpo-run {run.slug}").remote(run, str(out))
        self._refs[ref] = (run.slug, out)

    def wait(self) -> list[str]:
        refs = list(self._refs)
        while not self.ray.wait(refs, num_returns=1, timeout=1.0)[0]:
            pass  # a timeout, so that Ctrl-C is seen at once
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        done = []
        for ref in ready:
            slug, out = self._refs.pop(ref)
            try:
                self.ray.get(ref)
            except self.ray.exceptions.TaskCancelledError:
                pass
            except self.ray.exceptions.RayError as e:
                _record_lost(out / slug, e)
            done.append(slug)
        return done

    def stop(self) -> int:
        for ref in self._refs:
            self.ray.cancel(ref)  # queued: dropped; running: SIGINT in its worker -> after the step (run_task)
        stopped = 0
        ready, _ = self.ray.wait(list(self._refs), num_returns=len(self._refs), timeout=600)
        for ref in ready:
            try:
                self.ray.get(ref)
                stopped += 1  # it was running, and returned after its current step
            except self.ray.exceptions.RayError:
                pass  # cancelled before it started (or lost)
        self._refs = {}
        return stopped

    def close(self) -> None:
        self.ray.shutdown()
