"""Populating pages ahead of a read: the kernel really faults them in, and no byte changes."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import sys

import pytest
import torch

from checkpointer.format.tensor_io import memory_span
from checkpointer.runtime.pages import populate_for_write

_KERNEL = tuple(int(part) for part in os.uname().release.split(".")[:2]) if sys.platform == "linux" else (0, 0)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


@pytest.mark.skipif(_KERNEL < (5, 14), reason="MADV_POPULATE_WRITE needs Linux 5.14")
def test_populating_fresh_memory_makes_its_pages_resident_and_keeps_its_bytes():
    size = 64 << 20
    region = mmap.mmap(-1, size)  # anonymous and untouched: no page is resident yet
    anchor = ctypes.c_char.from_buffer(region)
    try:
        region[10:15] = b"hello"  # faults in the first page only
        before = _resident_bytes()
        populate_for_write(ctypes.addressof(anchor) + 12, size - 12)  # an unaligned start, as a tensor's may be
        grown = _resident_bytes() - before
        assert size - 2 * mmap.PAGESIZE <= grown <= size + (4 << 20)
        assert region[10:15] == b"hello" and region[size - 1] == 0
    finally:
        del anchor
        region.close()


def test_populating_nothing_or_memory_already_there_changes_nothing():
    tensor = torch.arange(1000, dtype=torch.int32)
    populate_for_write(*memory_span(tensor))
    populate_for_write(tensor.data_ptr(), 0)
    assert torch.equal(tensor, torch.arange(1000, dtype=torch.int32))


@pytest.mark.parametrize(
    "view",
    [
        torch.zeros(6, 8)[2:5],  # rows of a block
        torch.zeros(6, 8)[:, 3:5],  # a column box: from its first element to its last
        torch.zeros(4, 8, 3).view(2, 2, 8, 3).transpose(1, 2),  # RoPE heads, transposed
        torch.zeros(5)[4:],
    ],
)
def test_a_views_memory_span_runs_from_its_first_element_to_its_last(view):
    steps = [sum(i * s for i, s in zip(index, view.stride())) for index in itertools.product(*map(range, view.shape))]
    addresses = [view.data_ptr() + step * view.element_size() for step in steps]
    assert memory_span(view) == (min(addresses), max(addresses) + view.element_size() - min(addresses))


def test_an_empty_tensor_spans_no_memory():
    assert memory_span(torch.zeros(0, 4))[1] == 0

