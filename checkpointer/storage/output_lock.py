"""One job at a time per local output folder: an advisory lock held for the job's lifetime.

The lock is ``fcntl.flock`` on ``<output_dir>/.checkpointer.lock``: the kernel releases it
when the holder exits, even on SIGKILL, so a crashed job never leaves a stale lock. Within
one process the lock is shared: several checkpointers of the same job may use one folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from checkpointer.errors import CheckpointError
from checkpointer.format.folder import make_dirs

LOCK_FILE = ".checkpointer.lock"


_HELD: dict[Path, int] = {}  # lock file -> descriptor, for this process


class OutputLock:
    """An exclusive, non-blocking lock on a local output folder, shared within this process."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE

    @property
    def held(self) -> bool:
        return self.path.resolve() in _HELD

    def acquire(self) -> None:
        """Take the lock (once per process), or raise naming the process that holds it."""
        if self.held:
            return
        make_dirs(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent}: another job is writing checkpoints here ({holder}); "
                "use another output_dir or stop that job",
                url=str(self.path.parent), file=str(self.path),
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        _HELD[self.path.resolve()] = fd

    def release(self) -> None:
        fd = _HELD.pop(self.path.resolve(), None)
        if fd is not None:
            os.close(fd)
