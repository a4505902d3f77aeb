"""Cutting a rank's I/O into runs for its threads: in order, nothing lost, about equal bytes."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from checkpointer.runtime.parallel import even_runs, in_even_runs


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_even_runs_keep_the_order_and_split_the_bytes_evenly(parts):
    rng = random.Random(parts)
    for _ in range(200):
        sizes = [rng.choice([0, 1, 10, 1000, 10**6]) for _ in range(rng.randint(0, 30))]
        items = list(range(len(sizes)))
        runs = even_runs(items, sizes, parts)
        assert [i for run in runs for i in run] == items and all(runs) and len(runs) <= parts
        total = sum(sizes)
        assert all(sum(sizes[i] for i in run) <= total / parts + max(sizes) for run in runs)


def test_in_even_runs_runs_the_runs_at_once_without_autograd():
    together = threading.Barrier(3, timeout=30)  # passes only if the three runs are in flight at once
    grad_enabled = []

    def work(run: list[int]) -> list[int]:
        grad_enabled.append(torch.is_grad_enabled())
        together.wait()
        return run

    assert in_even_runs(work, list(range(6)), [1] * 6, threads=3) == [[0, 1], [2, 3], [4, 5]]
    assert grad_enabled == [False] * 3
