"""Wall time (barrier to barrier) and peak RSS growth of one operation on this rank; CPU use of a run.

The kernel's peak RSS (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs``
right before the operation; growth is ``VmHWM`` after minus ``VmRSS`` before. RSS counts
anonymous memory and mapped file pages (an ``mmap`` ed safetensors file counts), not the
page cache of files read or written with ``pread``/``pwrite``.
"""

from __future__ import annotations

import gc
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from checkpointer.runtime.distributed import barrier

_STATUS = "/proc/self/status"
_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    """One operation on one rank: seconds between the barriers, CPU seconds, peak RSS growth in bytes."""

    seconds: float
    cpu: float  # user + system time of this process (all threads) between the barriers
    growth: int


def memory_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    with open(_STATUS) as f:
        return {name: int(kb) * 1024 for name, kb in _FIELD.findall(f.read())}


def reset_peak() -> None:
    """Make ``VmHWM`` equal to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(operation: Callable[[], Any]) -> tuple[Sample, Any]:
    """Run ``operation`` on every rank between two barriers; its sample and its result."""
    gc.collect()
    reset_peak()
    before = memory_status()["VmRSS"]
    barrier()
    started, cpu = time.perf_counter(), time.process_time()
    result = operation()
    barrier()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Sample(seconds, cpu, memory_status()["VmHWM"] - before), result


class CpuUse:
    """CPU seconds used by this process and its (reaped) children vs by every other process, over a block."""

    def __enter__(self) -> CpuUse:
        self._start = (time.perf_counter(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        now = (time.perf_counter(), _busy_seconds(), _own_seconds())
        self.wall, busy, self.ours = (b - a for a, b in zip(self._start, now))
        self.others = max(0.0, busy - self.ours)
        self.available = self.wall * (os.cpu_count() or 1)


def _busy_seconds() -> float:
    """CPU seconds every process has used since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
