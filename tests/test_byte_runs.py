"""The writer sends a view's bytes in row-major order without copying it (byte_runs + pwritev)."""

from __future__ import annotations

import os

import pytest
import torch

from checkpointer.format.tensor_io import byte_runs, pwritev_all, tensor_bytes
from checkpointer.mapping.row_runs import local_view, rope_runs


def _views() -> dict[str, torch.Tensor]:
    local = torch.randn(48, 6).to(torch.bfloat16)
    views = {f"rope {r}": local_view(local, r, 8) for r in rope_runs(8, 56, head_dim=16)}  # partial, whole heads, partial
    return views | {
        "contiguous": local[4:10],
        "column slice": local[:, 1:4],
        "1-d strided": local[:, 0],
        "scalar": torch.tensor(3.0),
    }


@pytest.mark.parametrize("name", list(_views()))
def test_byte_runs_are_the_row_major_bytes_of_the_view(name):
    view = _views()[name]
    assert b"".join(bytes(p) for p in byte_runs(view)) == bytes(tensor_bytes(view.contiguous()))


def test_whole_heads_of_a_rope_view_are_sent_row_by_row_without_a_copy():
    local = torch.randn(32, 6).to(torch.bfloat16)
    (whole,) = [r for r in rope_runs(0, 32, head_dim=16) if r.head_dim]
    pieces = byte_runs(local_view(local, whole, 0))
    assert len(pieces) == 32 and all(p.obj is pieces[0].obj for p in pieces)  # views of the shard's own memory


def testpwritev_all_writes_more_pieces_than_one_call_takes(tmp_path):
    pieces = [memoryview(bytes([i % 251]) * (1 + i % 7)) for i in range(3000)]
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        assert pwritev_all(fd, pieces, 5) == sum(len(p) for p in pieces)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"\0" * 5 + b"".join(bytes(p) for p in pieces)
