"""A DCP StorageWriter that writes every rank's boxes into the final safetensors files.

The coordinator creates each file at its final size with its header (in
``prepare_global_plan``, before DCP scatters the plans, so the files exist before
anyone writes). Each rank then ``pwrite`` s its own boxes at their byte offsets and
fsyncs. ``finish`` runs on the coordinator once every rank has written (it writes the
index). There are no per-rank files and no consolidation pass: each byte is written once.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from checkpointer.errors import CheckpointError
from checkpointer.failpoints import failpoint
from checkpointer.file_layout import FileLayout
from checkpointer.safetensors_format import TensorEntry
from checkpointer.storage_reader import tensor_bytes

Finish = Callable[[Path], None]


def create_files(folder: Path, layout: FileLayout) -> None:
    """Create each file with its header, at its final size (the data is filled in by the ranks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, header in layout.headers.items():
        with open(folder / name, "wb") as f:
            f.write(header)
            f.truncate(layout.sizes[name])


def box_offset(entry: TensorEntry, offsets: tuple[int, ...], numel: int) -> int:
    """The file offset of a box of whole rows of ``entry`` starting at row ``offsets[0]``."""
    if not entry.shape:
        return entry.start
    row_elems = entry.row_bytes // entry.dtype.itemsize
    if any(offsets[1:]) or (row_elems and numel % row_elems):
        raise NotImplementedError(f"{entry.name}: writing boxes that split rows (tensor parallel) is not supported")
    return entry.start + offsets[0] * entry.row_bytes


def write_tensor(fd: int, entry: TensorEntry, tensor: torch.Tensor) -> int:
    """``pwrite`` a whole tensor, converted to ``entry``'s dtype, at its offset in an open file (from :func:`create_files`)."""
    if tuple(tensor.shape) != entry.shape:
        raise CheckpointError(f"{entry.file}: tensor {entry.name!r} has shape {tuple(tensor.shape)}, its header says {entry.shape}")
    return _pwrite_tensor(fd, tensor, entry.dtype, entry.start)


class SafetensorsWriter(StorageWriter):
    """Writes the boxes of a save plan into files laid out by a :class:`FileLayout`."""

    def __init__(self, folder: Path, layout: FileLayout, on_finish: Finish):
        self.folder = Path(folder)
        self.layout = layout
        self.on_finish = on_finish
        self.is_coordinator = False
        self.bytes_written = 0

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.bytes_written = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        create_files(self.folder, self.layout)
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        failpoint("save:write")
        results, fds = [], {}
        try:
            for item in sorted(plan.items, key=lambda i: (self.layout.entries[i.index.fqn].file, i.index.offset)):
                results.append(self._write_item(item, planner, fds))
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_item(self, item: WriteItem, planner: SavePlanner, fds: dict[str, int]) -> WriteResult:
        entry = self.layout.entries[item.index.fqn]
        data = planner.resolve_data(item)
        if entry.file not in fds:
            fds[entry.file] = os.open(self.folder / entry.file, os.O_WRONLY)
        offset = box_offset(entry, tuple(item.index.offset), data.numel())
        try:
            written = _pwrite_tensor(fds[entry.file], data, entry.dtype, offset)
        except OSError as e:
            hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
            raise CheckpointError(
                f"{self.folder / entry.file}: writing {entry.name} ({data.numel() * entry.dtype.itemsize} bytes at "
                f"offset {offset}) failed: {e.strerror}{hint}; the previous checkpoint is untouched"
            ) from e
        self.bytes_written += written
        return WriteResult(index=item.index, size_in_bytes=written, storage_data=None)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.on_finish(self.folder)

    def storage_meta(self):
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False


def _pwrite_tensor(fd: int, tensor: torch.Tensor, dtype: torch.dtype, offset: int) -> int:
    data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    return _pwrite_all(fd, tensor_bytes(data), offset)


def _pwrite_all(fd: int, payload: memoryview, offset: int) -> int:
    payload = payload.cast("B")
    done = 0
    while done < len(payload):
        done += os.pwrite(fd, payload[done:], offset + done)
    return done
