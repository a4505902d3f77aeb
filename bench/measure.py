"""Wall time (barrier to barrier) and peak RSS growth of one operation on this rank.

The kernel's peak RSS (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs``
right before the operation; growth is ``VmHWM`` after minus ``VmRSS`` before. RSS counts
anonymous memory and mapped file pages (an ``mmap`` ed safetensors file counts), not the
page cache of files read or written with ``pread``/``pwrite``.
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

_STATUS = "/proc/self/status"
_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    """One operation on one rank: seconds between the barriers, peak RSS growth in bytes."""

    seconds: float
    growth: int


def memory_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    with open(_STATUS) as f:
        return {name: int(kb) * 1024 for name, kb in _FIELD.findall(f.read())}


def reset_peak() -> None:
    """Make ``VmHWM`` equal to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def measure(operation: Callable[[], Any]) -> tuple[Sample, Any]:
    """Run ``operation`` on every rank between two barriers; its sample and its result."""
    gc.collect()
    reset_peak()
    before = memory_status()["VmRSS"]
    _barrier()
    started = time.perf_counter()
    result = operation()
    _barrier()
    seconds = time.perf_counter() - started
    return Sample(seconds, memory_status()["VmHWM"] - before), result
