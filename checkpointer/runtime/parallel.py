"""Byte-heavy work of one rank spread over the intra-op threads torch is given.

``preadv``, ``pwritev``, xxh3 and torch's copies release the GIL, so a rank that owns several
cores (one process per machine, or ``OMP_NUM_THREADS`` above 1 under ``torchrun``) fills or
writes its shards on all of them. Under ``torchrun``'s default of one thread, everything stays
on the calling thread.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def even_runs(items: Sequence[T], sizes: Sequence[int], parts: int) -> list[list[T]]:
    """``items`` cut, in order, into at most ``parts`` runs of about the same total size (none empty)."""
    total = max(sum(sizes), 1)
    runs: list[list[T]] = [[] for _ in range(parts)]
    for item, end in zip(items, itertools.accumulate(sizes)):
        runs[min(parts - 1, max(end - 1, 0) * parts // total)].append(item)
    return [run for run in runs if run]


def in_even_runs(work: Callable[[list[T]], R], items: Sequence[T], sizes: Sequence[int], threads: int | None = None) -> list[R]:
    """``work`` of each run of :func:`even_runs` (``threads``: default torch's), each on a thread; results in order.

    Autograd is off in every run (grad mode is per thread, and these are copies into or out of
    shards). The first error is raised once every run has stopped.
    """
    runs = even_runs(items, sizes, threads or torch.get_num_threads())

    def unrecorded(run: list[T]) -> R:
        with torch.no_grad():
            return work(run)

    if len(runs) <= 1:
        return [unrecorded(run) for run in runs]  # on the calling thread
    with ThreadPoolExecutor(len(runs), thread_name_prefix="checkpointer-io") as pool:
        futures = [pool.submit(unrecorded, run) for run in runs]
        return [future.result() for future in futures]
