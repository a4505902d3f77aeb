"""Running a step on every rank so that an error on any rank is raised on all of them.

DCP already does this for its own plan/read/write steps (as a ``CheckpointException``,
a ``BaseException``); :func:`dcp_errors` turns that into a :class:`CheckpointError`.
:func:`on_all_ranks` does the same for our steps outside DCP.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from checkpointer import errors
from checkpointer.errors import CheckpointError

T = TypeVar("T")


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group is up (collectives are needed)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def local_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; the rank when unset)."""
    return int(os.environ.get("LOCAL_RANK", rank(group)))


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if is_distributed():
        dist.barrier(group)


def _error_class(name: str) -> type[CheckpointError]:
    cls = getattr(errors, name, CheckpointError)
    return cls if isinstance(cls, type) and issubclass(cls, CheckpointError) else CheckpointError


def _raise_first(failures: list[tuple[int, str, str]], local: BaseException | None, world: int) -> None:
    failing_rank, class_name, message = failures[0]
    prefix = f"[rank {failing_rank}] " if world > 1 else ""
    raise _error_class(class_name)(prefix + message) from local


def on_all_ranks(step: Callable[[], T], group: dist.ProcessGroup | None = None) -> T:
    """Run ``step`` on every rank; if it fails anywhere, raise the same error everywhere.

    The error is the lowest failing rank's, prefixed with ``[rank N]``, of its class when
    that is a CheckpointError subclass; the local exception, if any, is its cause.
    """
    local_error: BaseException | None = None
    result: T | None = None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        local_error = e
    report = None if local_error is None else (rank(group), type(local_error).__name__, str(local_error))
    if not is_distributed(group):
        if local_error is not None:
            raise local_error
        return result  # type: ignore[return-value]
    reports: list = [None] * world_size(group)
    dist.all_gather_object(reports, report, group=group)
    failures = [r for r in reports if r is not None]
    if failures:
        _raise_first(failures, local_error, world_size(group))
    return result  # type: ignore[return-value]


def all_gather(value: T, group: dist.ProcessGroup | None = None) -> list[T]:
    """Every rank's (picklable) ``value``, in rank order; ``[value]`` without a process group."""
    if not is_distributed(group):
        return [value]
    values: list = [None] * world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def on_rank_zero(step: Callable[[], T], group: dist.ProcessGroup | None = None) -> T:
    """Run ``step`` on rank 0 only; every rank returns its (picklable) result or raises its error."""
    if not is_distributed(group):
        return step()
    payload: list = [None]
    local_error: BaseException | None = None
    if rank(group) == 0:
        try:
            payload = [("ok", step())]
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            local_error = e
            payload = [("error", 0, type(e).__name__, str(e))]
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(payload, src=source, group=group)
    if payload[0][0] == "error":
        _raise_first([payload[0][1:]], local_error, world_size(group))
    return payload[0][1]


@contextlib.contextmanager
def dcp_errors(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Turn DCP's ``CheckpointException`` (a BaseException) into a plain CheckpointError."""
    try:
        yield
    except CheckpointException as e:
        failures = sorted(e.failures.items())
        details = [(r, type(exc).__name__, str(exc)) for r, (exc, _trace) in failures]
        original = failures[0][1][0] if failures else None
        _raise_first(details, original if isinstance(original, Exception) else None, world_size(group))
