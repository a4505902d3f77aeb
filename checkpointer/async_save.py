"""Saving in the background: copy this rank's shards into reusable buffers, write and publish on a thread.

The background save runs its collectives on a process group of its own (created once, by
every rank at its first asynchronous save), so they never interleave with the training
loop's. One save is in flight at a time; its error is raised by :meth:`AsyncSave.wait`.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Generic, TypeVar

import torch.distributed as dist

from checkpointer import phases
from checkpointer.dcp.staging import StagingBuffers
from checkpointer.errors import CheckpointError

T = TypeVar("T")


class AsyncSave(Generic[T]):
    """At most one background save at a time, over its own process group."""

    def __init__(self) -> None:
        self._staging = StagingBuffers()
        self._pending: concurrent.futures.Future[T] | None = None
        self._group: dist.ProcessGroup | None = None
        self._executor: concurrent.futures.Executor | None = None
        self.last_blocked_seconds: float | None = None  # how long the last start() held the caller

    def start(self, save: Callable[[dict[str, Any], dist.ProcessGroup | None], T], state_dict: dict[str, Any]) -> None:
        """Stage ``state_dict``, then run ``save(staged, group)`` in the background (collective: every rank calls it)."""
        if self._pending is not None:
            raise CheckpointError("AsyncSave.start: the previous save is still pending; wait() for it first")
        started = time.perf_counter()
        staged = self._staging.stage(state_dict)
        self.last_blocked_seconds = time.perf_counter() - started
        if self._executor is None:
            self._group = phases.new_group()
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpointer-save")
        self._pending = self._executor.submit(save, staged, self._group)

    def wait(self) -> T | None:
        """The pending save's result once it is published (None if none); raises its error."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None
