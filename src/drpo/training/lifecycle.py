"""The life of a run directory around the training loop: lock, resume, status, checkpoints, summary.

    open     take the lock (a second process on the same --out exits at once), refuse to overwrite a
             run, find the newest readable checkpoint when resuming (drpo.training.checkpoint), check that
             the configuration did not change (drpo.training.resume), and apply the run's environment --
             threads, memory policy -- recording it and comparing it with the checkpoint's
             (drpo.training.environment)
    running  ``with life.running(step):`` status ``running``; on the way out the status says how the
             run ended, the metrics log is closed and the lock released:

                 finished     every step ran
                 interrupted  Ctrl-C, or SIGTERM from a scheduler (then after the current step and a
                              checkpoint of it: see :class:`Terminated`)
                 collapsed    stopped by train.stop_on_collapse (drpo.training.collapse)
                 failed       the run cannot go on: ``cause`` = diverged (NaN/inf), rollout_worker
                              (the worker died), reward (the reward function is broken), or
                              exception (a bug: its traceback is in <out>/traceback.txt)
                 error        the machine failed it: the disk is full

    save     a checkpoint (model, optimizer, RNG, environment, the versions a stale rollout needs)
    summary  held-out accuracy before and after, and the collapse verdict, from metrics.jsonl
"""
from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from drpo.models import load_state
from drpo.rewards import RewardError
from drpo.rollout import RolloutWorkerError
from drpo.training import checkpoint as ckpt_io
from drpo.training.checkpoint import Checkpoint, CheckpointState, rng_state
from drpo.training.collapse import CollapseMonitor, CollapseState, detect_collapse
from drpo.training.disk import DiskFull
from drpo.training.environment import RunEnvironment
from drpo.training.lock import RunLock
from drpo.training.metrics_log import MetricsLog, read_metrics, set_aside_metrics_after
from drpo.training.resume import check_resume_config
from drpo.training.status import write_status
from drpo.utils.errors import UserError


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending the job): handled like Ctrl-C, after the current step's checkpoint."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf: the run stops after saving what was logged."""


class RunCollapsed(RuntimeError):
    """train.stop_on_collapse: the run collapsed beyond recovery and was stopped early."""


# failures of a run's parts that stop it with status 'failed' and the cause named here
CAUSES: dict[type, str] = {RolloutWorkerError: "rollout_worker", RewardError: "reward"}
# what a run raises that says, in one line, why it stopped (the CLI prints it and exits 1)
ONE_LINE_STOPS = (TrainingDiverged, RunCollapsed, DiskFull, *CAUSES)


class RunExists(UserError, FileExistsError):
    """``--out`` already holds a run (and ``--resume`` was not given), or is a file."""


def default_out(objective: str) -> str:
    """The run directory when none is given: runs/<objective>-<date-time>."""
    return f"runs/{objective}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def progress_line(m: dict[str, Any], collapse: CollapseState) -> dict[str, str]:
    """The figures of a step shown in the progress bar: reward, held-out accuracy, and a collapse."""
    return {"reward": f"{m['reward/mean']:.3f}", **({"acc": f"{m['eval/accuracy']:.3f}"} if "eval/accuracy" in m
                                                    else {}), **({"collapsed": f"since step {collapse.began}"}
                                                                 if collapse.now else {})}


class RunLifecycle:
    def __init__(self, out: Path, *, resume: bool, notify: Callable[[str], None] = print,
                 progress: bool = True) -> None:
        self.out, self.notify = Path(out), notify
        if not progress:  # transformers' loading/saving bars too: a quiet run prints only what it has to say
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if self.out.exists() and not self.out.is_dir():
            raise RunExists(f"--out {self.out} is a file; give a folder for the run")
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out)
        self.checkpoint: Optional[Checkpoint] = None  # the one to resume from, until restored
        self.environment: Optional[RunEnvironment] = None  # set by begin()
        self.last_checkpoint: Optional[int] = None
        self.last_step = 0
        self._log: Optional[MetricsLog] = None
        self._term_requested = False
        try:
            self._open(resume)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, resume: bool) -> None:
        if self.lock.previous_owner is not None:
            self.notify(f"note: took over the lock of {self.out} left by process {self.lock.previous_owner}, "
                        "which is no longer running")
        if (self.out / "metrics.jsonl").exists() and not resume:
            raise RunExists(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if not resume:
            return
        self.checkpoint = ckpt_io.latest_valid_checkpoint(self.out, warn=self.notify)
        if self.checkpoint is None:
            moved = set_aside_metrics_after(self.out, -1)
            self.notify(f"note: {self.out} has no usable checkpoint; starting the run over from step 0"
                        + (f" ({moved} logged rows moved to metrics.replaced.jsonl)" if moved else ""))

    def begin(self, config: dict[str, Any], threads: Optional[int], processes: int) -> RunEnvironment:
        """Refuse to resume with a configuration that differs from the checkpoint's (drpo.training.resume); then apply
        the run's environment for ``processes`` processes (drpo.training.environment) and return it."""
        resumed = self.checkpoint.state if self.checkpoint is not None else None
        if resumed is not None:
            check_resume_config(resumed.config, config, resumed.step)
        self.environment = RunEnvironment.apply(threads, processes=processes, notify=self.notify,
                                                resumed=resumed.environment if resumed else None)
        return self.environment

    @property
    def info(self) -> dict[str, Any]:
        """What every status.json says besides the state: the run's environment."""
        return asdict(self.environment) if self.environment is not None else {}

    def restore(self, model, optimizer, scheduler) -> tuple[CheckpointState, dict]:
        """Load the checkpoint found at open into ``model``, ``optimizer``, ``scheduler`` and the RNGs; set aside
        the rows logged after it. Returns (its state, the rollout versions it holds)."""
        ckpt = self.checkpoint
        if ckpt.path != ckpt_io.latest_checkpoint(self.out):
            self.notify(f"note: resuming from {ckpt.path.name}, the newest checkpoint that can be read")
        load_state(model, ckpt.model, where=str(ckpt.path))
        ckpt_io.restore_optimizer(optimizer, scheduler, ckpt)
        ckpt_io.set_rng_state(ckpt.state.rng)
        self.last_step = self.last_checkpoint = ckpt.state.step
        set_aside_metrics_after(self.out, ckpt.state.step)
        self.checkpoint = None  # restored: the trainer holds it now
        return ckpt.state, ckpt.rollout_versions

    # ------------------------------------------------------------------ while running
    @contextlib.contextmanager
    def running(self, start_step: int, tensorboard: bool) -> Iterator["RunLifecycle"]:
        """Status ``running`` for the block; the status on the way out says how it ended (module docstring)."""
        self._log = MetricsLog(self.out, tensorboard=tensorboard)
        self._watch = CollapseMonitor()
        for row in read_metrics(self.out / "metrics.jsonl"):  # a resumed run's earlier steps
            self._watch.update(row["step"], row)
        write_status(self.out, "running", step=start_step, **self.info)
        installed, previous = self._handle_sigterm()
        try:
            yield self
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
            write_status(self.out, "interrupted", step=self.last_step, checkpoint=self.last_checkpoint,
                                signal="SIGTERM" if isinstance(e, Terminated) else "SIGINT", **self.info)
            raise
        except TrainingDiverged as e:
            self._fail("failed", e, cause="diverged")
            raise
        except RunCollapsed as e:
            self._fail("collapsed", e)
            raise
        except tuple(CAUSES) as e:
            self._fail("failed", e, cause=next(c for t, c in CAUSES.items() if isinstance(e, t)))
            raise
        except DiskFull as e:
            self._fail("error", e, cause="disk_full")
            raise
        except BaseException as e:
            (self.out / "traceback.txt").write_text(traceback.format_exc())
            self._fail("failed", e, cause="exception", reason=f"{type(e).__name__}: {e}")
            raise
        else:
            write_status(self.out, "finished", step=self.last_step, **self.info)
        finally:
            if installed:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            self._log.close()
            self._log = None
            self.lock.release()

    def _fail(self, state: str, e: BaseException, *, reason: Optional[str] = None, **info: Any) -> None:
        write_status(self.out, state, step=self.last_step, reason=reason or str(e), **info, **self.info)

    def _handle_sigterm(self):
        """SIGTERM asks the loop to stop after the current step (see :meth:`stop_requested`); a second
        one stops at once. Only the main thread can install a handler (else nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            return False, None

        def on_term(signum, frame) -> None:
            if self._term_requested:
                raise Terminated()
            self._term_requested = True

        return True, signal.signal(signal.SIGTERM, on_term)

    def stop_requested(self) -> bool:
        """A SIGTERM arrived: the caller checkpoints the step it finished and raises :class:`Terminated`."""
        return self._term_requested

    def log(self, step: int, metrics: dict[str, Any]) -> CollapseState:
        """Write ``step``'s metrics; returns the collapse watch's verdict so far (drpo.training.collapse),
        said once with ``notify`` when a collapse begins."""
        assert self._log is not None, "log() outside running()"
        self._log.write(step, metrics)
        self.last_step = step
        write_status(self.out, "running", step=step, **self.info)
        was = self._watch.state.collapsed
        state = self._watch.update(step, metrics)
        if state.collapsed and not was:
            self.notify(f"warning: collapsed at step {state.began}: {state.reason}")
        return state

    def save(self, step: int, config: dict[str, Any], model, tokenizer, optimizer, scheduler, *,
             delta: Optional[float], rollout_versions: dict) -> Path:
        """Checkpoint after ``step`` steps: the weights, optimizer and scheduler, and a :class:`CheckpointState` of
        ``config`` (what --resume compares against), the environment, ``delta`` and the RNGs."""
        state = CheckpointState(step=step, config=config, environment=self.environment, delta=delta, rng=rng_state())
        path = ckpt_io.save_checkpoint(self.out, model, tokenizer, optimizer, scheduler, state,
                                       rollout_versions=rollout_versions)
        self.last_checkpoint = step
        return path

    def summary(self) -> dict[str, Any]:
        """The finished run: its folder, held-out accuracy at the first and last evaluation, and the
        collapse verdict (drpo.training.collapse)."""
        rows = read_metrics(self.out / "metrics.jsonl")
        accs = [float(r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        out: dict[str, Any] = {"out": str(self.out), "collapse": detect_collapse(rows)}
        if accs:
            out.update(accuracy_before=accs[0], accuracy_after=accs[-1])
        return out
