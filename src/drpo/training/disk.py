"""A full disk (or a used-up quota) while a run writes its files: :class:`DiskFull`, one line naming the path, the
free space and (when known) what was needed. The writers (drpo.training.checkpoint, .metrics_log, .status) never
leave a partial file behind."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional


class DiskFull(OSError):
    """A run file could not be written: its disk is full (ENOSPC) or the quota used up (EDQUOT).

    path:   the file or folder being written
    free:   bytes free on its disk afterwards (after the partial file was removed)
    needed: about how many bytes the write needed, None when unknown
    The message is one line saying so, and what to do; ``errno`` is ENOSPC.
    """

    def __init__(self, message: str, path: os.PathLike | str, free: int, needed: Optional[int] = None) -> None:
        super().__init__(errno.ENOSPC, message)
        self.path, self.free, self.needed = Path(path), free, needed

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return type(self), (self.strerror, str(self.path), self.free, self.needed)


LOW_SPACE_BYTES = 1 << 20  # a write that fails with less than this free failed for lack of space
_FULL_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the disk holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def size_text(n: Optional[int]) -> str:
    """``512 B``, ``3.2 KiB``, ``1.5 GiB``."""
    if n is None or n < 0:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def is_disk_full(error: BaseException, path: Optional[Path] = None) -> bool:
    """Whether ``error`` (or an error it was raised from) says the disk is full or the quota used
    up. Writers that do not say (torch.save: ``unexpected pos``) are recognised by the disk of
    ``path`` having less than :data:`LOW_SPACE_BYTES` free at once after they failed."""
    seen: set[int] = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in _FULL_MESSAGES):
            return True
        e = e.__cause__ or e.__context__
    return path is not None and 0 <= free_bytes(path) < LOW_SPACE_BYTES


def full(what: str, path: Path, needed: Optional[int], done: str, todo: str) -> DiskFull:
    free = free_bytes(path)
    need = f", about {size_text(needed)} needed" if needed else ""
    return DiskFull(f"disk full: could not write {what} ({size_text(free)} free{need}){done}; {todo}", path, free, needed)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
