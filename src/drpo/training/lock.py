"""One process at a time per run directory: :class:`RunLock` takes an exclusive ``flock`` on ``<out>/.lock`` and writes
its pid there; a second process gets :class:`RunLocked` at once. The kernel releases the lock when its process dies,
so a lock left by a killed run is taken over (and its pid reported as :attr:`RunLock.previous_owner`)."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from drpo.utils.errors import UserError


class RunLocked(UserError, RuntimeError):
    """Another live process is running in this run directory."""


class RunLock:
    """An exclusive lock on a run directory for the life of this object (or of the process)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.previous_owner: Optional[int] = None  # pid of a dead process whose lock was taken over
        self._fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            owner = self._fh.read().strip() or "another process"
            self._fh.close()
            raise RunLocked(f"{run_dir} is in use by {owner}; wait for it to end, or choose another --out") from None
        self._fh.seek(0)
        old = self._fh.read().split()
        if old and old[0] == "pid" and len(old) > 1 and old[1].isdigit() and int(old[1]) != os.getpid():
            self.previous_owner = int(old[1])
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
