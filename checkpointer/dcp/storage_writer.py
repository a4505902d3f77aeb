"""A DCP StorageWriter that writes every rank's boxes into the final safetensors files.

The coordinator creates each file at its final size with its header (in
``prepare_global_plan``, before DCP scatters the plans, so the files exist before
anyone writes). Each rank then ``pwrite`` s its own boxes at their byte offsets and
fsyncs. Ranks start on different files (rank r on the r-th, then onwards), so that they
rarely write into the same file at once (buffered writes to one file serialize on its
inode lock); writeback of each box of whole rows is started as soon as it is written (Linux
``sync_file_range``), so the final fsync mostly finds it done. A column box's rows share
their pages with the other ranks' columns, so its writeback waits for the fsync: started
early, those pages would go to disk once per rank. A box whose rows are
scattered in memory (the transposed views of RoPE-permuted q/k heads) is written row by
row with ``pwritev``, straight from the shard, without a contiguous copy. A box that splits
rows (a tensor-parallel column block) lands as one byte run per row of the file
(``format.box_runs``): one ``pwrite`` per run. Each rank hashes every box from the memory it
writes it from (xxh3, :mod:`checkpointer.format.digests`; a column box's rows as one strided
range) and returns the digests with the box's write result. A rank's boxes are written on torch's intra-op
threads (:mod:`checkpointer.runtime.parallel`), each over a run of them in this order with
about the same bytes. ``finish`` runs on the coordinator once
every rank has written: it gathers the digests (:attr:`SafetensorsWriter.digests`, which
must tile every file) and writes the index. There are no per-rank files, no consolidation
pass and no read-back: each byte is written once and never read again.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from checkpointer.dcp.routing import Channel, Route, plan_routes
from checkpointer.dcp.wire import BoxResult
from checkpointer.errors import CheckpointError, CheckpointMismatchError, CheckpointTransportError
from checkpointer.format.box_runs import ByteRun, Strided, box_byte_runs, strided_runs
from checkpointer.format.digests import Digests, Range, check_tiling, digest_of
from checkpointer.format.file_layout import FileLayout
from checkpointer.format.tensor_io import byte_runs, create_files
from checkpointer.format.vectored import pwrite_runs, pwritev_all, split_pieces
from checkpointer.runtime.failpoints import failpoint
from checkpointer.runtime.parallel import in_even_runs

Finish = Callable[[Path], None]


class SafetensorsWriter(StorageWriter):
    """Writes the boxes of a save plan into files laid out by a :class:`FileLayout`."""

    def __init__(self, folder: Path, file_layout: FileLayout, on_finish: Finish, channel: Channel | None = None):
        self.folder = Path(folder)
        self.file_layout = file_layout
        self.on_finish = on_finish
        self.channel = channel  # set when the ranks share no file system: boxes travel to rank 0's node
        self.is_coordinator = False
        self.rank = 0
        self.bytes_written = 0
        self.digests: Digests = {}  # on the coordinator, after finish: every file's ranges

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.bytes_written = 0
        self.digests = {}

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        create_files(self.folder, self.file_layout)
        if self.channel is None or self.channel.nodes.shared:
            return plans
        for plan in plans:  # a bad box fails here, on every rank, not on its sender while its receiver waits
            for item in plan.items:
                self._file_runs(item)
        routes = plan_routes(plans, self.channel.nodes, lambda item: self.file_layout.entries[item.index.fqn].dtype.itemsize)
        return [dataclasses.replace(plan, storage_data=route) for plan, route in zip(plans, routes)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        failpoint("save:write")
        route = plan.storage_data if isinstance(plan.storage_data, Route) else None
        if route is not None and route.send_to is not None:
            return self._send_items(plan, planner, route.send_to)
        order = _rotated(sorted(self.file_layout.headers), self.rank)
        items = sorted(plan.items, key=lambda i: (order[self.file_layout.entries[i.index.fqn].file], i.index.offset))
        boxes = [(item, self._file_runs(item)) for item in items]  # every box is checked before any byte is written
        opened: list[dict[str, int]] = []  # each thread's file descriptors (a file may be open on several)
        every_fd = lambda: [fd for fds in opened for fd in fds.values()]  # noqa: E731

        def write(part: list[tuple[WriteItem, list[ByteRun]]]) -> list[WriteResult]:
            fds: dict[str, int] = {}
            opened.append(fds)
            return [self._write_item(item, runs, planner, fds) for item, runs in part]

        try:
            sizes = [sum(length for _, length in runs) for _, runs in boxes]
            results = [result for part in in_even_runs(write, boxes, sizes) for result in part]
            self.bytes_written += sum(result.size_in_bytes for result in results)
            received_fds: dict[str, int] = {}
            opened.append(received_fds)
            for sender, received in route.receive if route is not None else ():
                for item in received:
                    self._receive_item(item, sender, received_fds)
            for fd in every_fd():
                os.fsync(fd)
        finally:
            for fd in every_fd():
                os.close(fd)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _file_runs(self, item: WriteItem) -> list[ByteRun]:
        entry = self.file_layout.entries.get(item.index.fqn)
        if entry is None or item.tensor_data is None:
            raise CheckpointMismatchError(
                f"{self.folder}: the save plan names {item.index.fqn!r}, which the file layout does not hold", key=item.index.fqn
            )
        return box_byte_runs(entry, tuple(item.index.offset), tuple(item.tensor_data.chunk.sizes))

    def _box_data(self, item: WriteItem, planner: SavePlanner) -> torch.Tensor:
        """The box's data in its file's dtype, on the CPU (checked against the box's size)."""
        entry = self.file_layout.entries[item.index.fqn]
        data = planner.resolve_data(item).detach().to(device="cpu", dtype=entry.dtype)
        sizes = tuple(item.tensor_data.chunk.sizes)
        if data.numel() != math.prod(sizes):
            raise CheckpointMismatchError(
                f"{entry.file}: the data for {entry.name!r} at {tuple(item.index.offset)} holds {data.numel()} elements, "
                f"its box {sizes} holds {math.prod(sizes)}",
                file=entry.file,
                key=entry.name,
            )
        return data

    def _send_items(self, plan: SavePlan, planner: SavePlanner, receiver: int) -> Future[list[WriteResult]]:
        """Send this rank's boxes, in plan order, to the rank of rank 0's node that writes them (hashed here, from memory)."""
        boxes = [(item, self._file_runs(item)) for item in plan.items]  # every box is checked before any byte is sent
        results = []
        for item, runs in boxes:
            entry = self.file_layout.entries[item.index.fqn]
            pieces = byte_runs(self._box_data(item, planner))
            size = sum(length for _, length in runs)
            self.channel.send(pieces, size, receiver, f"sending {entry.name} of {entry.file}")
            results.append(BoxResult(index=item.index, size_in_bytes=size, storage_data=box_digests(entry.file, runs, pieces)))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _receive_item(self, item: WriteItem, sender: int, fds: dict[str, int]) -> None:
        """Receive one box from ``sender`` in chunks and write them along its file runs (its sender reports the digests)."""
        entry = self.file_layout.entries[item.index.fqn]
        runs = self._file_runs(item)
        if entry.file not in fds:
            fds[entry.file] = os.open(self.folder / entry.file, os.O_WRONLY)
        cursor = _RunCursor(runs)

        def write(_done: int, chunk: memoryview) -> None:
            start = 0
            for offset, length in cursor.take(len(chunk)):
                try:
                    self.bytes_written += pwritev_all(fds[entry.file], [chunk[start : start + length]], offset)
                except OSError as e:
                    raise CheckpointTransportError(
                        f"{self.folder / entry.file}: writing {entry.name} ({length} bytes at offset {offset}) failed: "
                        f"{e.strerror}; the previous checkpoint is untouched", file=str(self.folder / entry.file), key=entry.name,
                    ) from e  # fmt: skip
                start += length

        self.channel.receive(sum(length for _, length in runs), sender, f"receiving {entry.name} of {self.folder / entry.file}", write)

    def _write_item(self, item: WriteItem, runs: list[ByteRun], planner: SavePlanner, fds: dict[str, int]) -> WriteResult:
        """Write one box, run by run; its result holds ``(file, offset, length, digest)`` of each run."""
        entry = self.file_layout.entries[item.index.fqn]
        data = self._box_data(item, planner)
        if entry.file not in fds:
            fds[entry.file] = os.open(self.folder / entry.file, os.O_WRONLY)
        pieces = byte_runs(data)
        try:
            written = pwrite_runs(fds[entry.file], pieces, runs)
        except OSError as e:
            hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
            raise CheckpointTransportError(
                f"{self.folder / entry.file}: writing {entry.name} ({data.numel() * entry.dtype.itemsize} bytes at "
                f"offset {runs[0][0]}) failed: {e.strerror}{hint}; the previous checkpoint is untouched",
                file=str(self.folder / entry.file), key=entry.name,
            ) from e
        if len(runs) == 1:
            _start_writeback(fds[entry.file], runs[0][0], runs[0][1])
        return BoxResult(index=item.index, size_in_bytes=written, storage_data=box_digests(entry.file, runs, pieces))

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.digests = file_digests(self.file_layout, [run for rank_results in results for r in rank_results for run in r.storage_data])
        self.on_finish(self.folder)

    def storage_meta(self):
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False


def box_digests(file: str, runs: list[ByteRun], pieces: list[memoryview]) -> list[tuple[str, Range]]:
    """The digests of a box's bytes (``pieces``, back to back), one per strided range of its file ``runs``."""
    groups = strided_runs(runs)
    parts = split_pieces(pieces, [(group.offset, group.nbytes) for group in groups])
    return [(file, Range.of(group, digest_of(part))) for group, part in zip(groups, parts)]


def file_digests(file_layout: FileLayout, boxes: list[tuple[str, Range]]) -> Digests:
    """Every file's ranges: its header (hashed from the layout) and each written box (hashed by its writer)."""
    ranges: Digests = {name: [Range.of(Strided.one(0, len(header)), digest_of([header]))] for name, header in file_layout.headers.items()}
    for file, found in boxes:
        if found.length:
            ranges[file].append(found)
    try:
        return {name: check_tiling(name, found, file_layout.sizes[name]) for name, found in ranges.items()}
    except CheckpointError as e:
        raise CheckpointError(f"the written boxes do not cover every byte of their file (a planning bug): {e}") from None


class _RunCursor:
    """Walks a box's file runs as its bytes arrive in order: which file ranges the next ``n`` bytes fill."""

    def __init__(self, runs: list[ByteRun]):
        self.runs, self.index, self.within = runs, 0, 0

    def take(self, n: int) -> list[ByteRun]:
        ranges = []
        while n:
            offset, length = self.runs[self.index]
            step = min(n, length - self.within)
            ranges.append((offset + self.within, step))
            self.within, n = self.within + step, n - step
            if self.within == length:
                self.index, self.within = self.index + 1, 0
        return ranges


def _rotated(files: list[str], rank: int) -> dict[str, int]:
    """File -> its place in this rank's writing order: the ``rank``-th file first, then onwards."""
    return {file: (i - rank) % len(files) for i, file in enumerate(files)} if files else {}


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now (a hint: fsync still decides)."""
    if _SYNC_FILE_RANGE is not None and length:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
