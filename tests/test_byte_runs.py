"""Views' bytes move in row-major order without copies: the writer sends them (byte_runs + pwritev), the reader fills them (row_views + preadv)."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.folder import Folder, LocalFolder
from checkpointer.format.tensor_io import byte_runs, row_views, tensor_bytes
from checkpointer.format.vectored import pwritev_all
from checkpointer.mapping.row_runs import local_view, rope_runs
from checkpointer.storage.fsspec_location import FsspecFolder


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


def _folders(tmp_path, data: bytes) -> dict[str, Folder]:
    (tmp_path / "f.bin").write_bytes(data)
    memory = fsspec.filesystem("memory")
    memory.pipe_file(f"/{tmp_path.name}/f.bin", data)
    return {"local": LocalFolder(tmp_path), "fsspec": FsspecFolder(memory, f"/{tmp_path.name}", f"memory://{tmp_path.name}")}


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_read_into_fills_the_scattered_rows_of_a_view_in_place(tmp_path, where):
    """More rows than one preadv takes land, in file order, in a transposed view's own memory."""
    rows, width = 3000, 4
    source = torch.arange(rows * width, dtype=torch.int16).view(rows, width)
    shard = torch.zeros(rows, width, dtype=torch.int16)
    view = shard.view(rows // 2, 2, width).transpose(0, 1)  # rows of the file go to rows 0, 2, 4, ... then 1, 3, ...
    pieces = row_views(view)
    assert len(pieces) == rows and all(p.obj is pieces[0].obj for p in pieces)
    _folders(tmp_path, b"head" + bytes(tensor_bytes(source)))[where].read_into("f.bin", 4, pieces)
    assert torch.equal(view, source.view(2, rows // 2, width))
    assert torch.equal(shard[0::2], source[: rows // 2]) and torch.equal(shard[1::2], source[rows // 2 :])


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_read_into_past_the_end_of_the_file_names_it(tmp_path, where):
    pieces = [memoryview(bytearray(6)) for _ in range(3)]
    with pytest.raises(CheckpointFormatError, match="f.bin"):
        _folders(tmp_path, bytes(range(20)))[where].read_into("f.bin", 4, pieces)


def _column_box_runs(rows: int, width: int, box: slice, start: int) -> list[tuple[int, int]]:
    """The file runs of columns ``box`` of a [rows, width] int16 tensor whose data starts at ``start``."""
    return [(start + 2 * (r * width + box.start), 2 * (box.stop - box.start)) for r in range(rows)]


@pytest.mark.parametrize("where", ["local", "fsspec"])
@pytest.mark.parametrize("into", ["one buffer", "row views"])
def test_read_runs_fills_a_column_box_and_counts_what_it_fetched(tmp_path, where, into):
    """A local folder reads each row's run alone; a remote one fetches the rows' span in one request and cuts it."""
    rows, width, box = 500, 12, slice(4, 7)
    source = torch.arange(rows * width, dtype=torch.int16).view(rows, width)
    runs = _column_box_runs(rows, width, box, start=4)
    if into == "one buffer":
        target = torch.zeros(rows, box.stop - box.start, dtype=torch.int16)
        out = [tensor_bytes(target)]
    else:  # the rows of a view are apart in memory: one piece per row
        target = torch.zeros(rows, 8, dtype=torch.int16)[:, 2 : 2 + box.stop - box.start]
        out = row_views(target)
        assert len(out) == rows
    fetched = _folders(tmp_path, b"head" + bytes(tensor_bytes(source)))[where].read_runs("f.bin", runs, out)
    assert torch.equal(target, source[:, box])
    span = runs[-1][0] + runs[-1][1] - runs[0][0]
    assert fetched == (sum(n for _, n in runs) if where == "local" else span)


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_read_runs_past_the_end_of_the_file_names_it(tmp_path, where):
    runs = _column_box_runs(rows=4, width=8, box=slice(2, 4), start=0)  # 4 rows of 8 int16: 64 bytes, the file has 40
    with pytest.raises(CheckpointFormatError, match="f.bin: truncated"):
        _folders(tmp_path, bytes(40))[where].read_runs("f.bin", runs, [memoryview(bytearray(16))])


def test_views_without_contiguous_rows_have_no_row_views():
    assert row_views(torch.zeros(4, 6)[:, 0]) is None and row_views(torch.zeros(4, 6).t()) is None
    assert row_views(torch.zeros(1, 6).expand(4, 6)) is None  # its rows are one row of memory
