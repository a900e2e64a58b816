"""The ``drpo`` command with one fault at a step the test chooses, so that a fault test's outcome does not
depend on how fast the machine is (which step a poll happened to see).

    python -m faulty_cli pause STEP train ...        (tests/ on PYTHONPATH: see :func:`command`)

    pause        at the start of 0-based step STEP the trainer writes its pid to ``<out>/paused`` and waits
                 there until a SIGTERM arrives (then the step runs and the run stops after it, as a
                 scheduler's notice mid-step) or the process is killed; the test sends the signal once the
                 file exists, knowing exactly where the run is
    kill_worker  the rollout worker (rollout.staleness >= 1) kills itself with SIGKILL, as the OOM killer
                 would, when it is to generate the batch of step STEP, once the trainer has logged STEP
                 rows: every earlier batch has arrived, so the trainer fails in step STEP + 1, never later

A hook, not a feature of drpo: it patches the trainer in this process (``pause``) or the collector the
trainer sends to its worker (``kill_worker``; a subclass defined here, which the worker imports by name).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from drpo.rollout.collect import Collector

WAIT_S = 600.0  # a test that never sends its signal fails instead of hanging
PAUSED = "paused"  # the file the trainer writes where it waits (``pause``)


def command(fault: str, step: int, *args: str) -> list[str]:
    """The argv of ``drpo`` ``args`` with ``fault`` at 0-based ``step``."""
    return [sys.executable, "-m", "faulty_cli", fault, str(step), *args]


class KillingCollector(Collector):
    """A :class:`Collector` whose copy in the rollout worker kills that process at batch ``FAULTY_STEP``
    (environment, inherited by the worker) once ``FAULTY_METRICS`` holds that many rows."""

    def collect(self, step, engine, version):
        if step == int(os.environ["FAULTY_STEP"]) and os.environ.get("FAULTY_TRAINER") != str(os.getpid()):
            metrics, t0 = Path(os.environ["FAULTY_METRICS"]), time.monotonic()
            while not metrics.exists() or len(metrics.read_text().splitlines()) < step:
                if time.monotonic() - t0 > WAIT_S:
                    raise RuntimeError(f"the trainer never logged {step} rows")
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().collect(step, engine, version)


def _pause_at(at: int) -> None:
    from drpo.training.trainer import Trainer

    real = Trainer.step

    def step(self, i):
        if i == at:
            (self.life.out / PAUSED).write_text(str(os.getpid()))
            t0 = time.monotonic()
            while not self.life.stop_requested():  # set by the run's own SIGTERM handler
                if time.monotonic() - t0 > WAIT_S:
                    raise RuntimeError("no SIGTERM came")
                time.sleep(0.02)
        return real(self, i)

    Trainer.step = step


def _kill_worker_at(at: int, args: list[str]) -> None:
    import faulty_cli  # by its name, not __main__: the worker unpickles the collector's class from it
    from drpo.training import trainer

    out = next(a.split("=", 1)[1] for a in args if a.startswith("out="))
    os.environ.update(FAULTY_STEP=str(at), FAULTY_METRICS=str(Path(out) / "metrics.jsonl"),
                      FAULTY_TRAINER=str(os.getpid()))
    trainer.Collector = faulty_cli.KillingCollector


def main() -> None:
    fault, at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    {"pause": lambda: _pause_at(at), "kill_worker": lambda: _kill_worker_at(at, args)}[fault]()
    from drpo.cli import main as drpo_main

    sys.argv = ["drpo", *args]
    drpo_main()


if __name__ == "__main__":
    main()
