"""A DCP StorageReader over the safetensors files of a Hugging Face checkpoint.

It reads exactly the byte ranges that the load plan names. When the destination has the
file's dtype and contiguous rows the bytes go straight into it, one ``preadv`` piece per
row where its rows are scattered (the transposed views of RoPE-permuted q/k heads);
otherwise they go through a buffer of one block and ``copy_`` converts dtype and
scatters into the view.
One buffer per thread serves every block of a load (it grows to the largest), so its pages
are faulted in once rather than once per block; the pages of each destination are populated
in one call before it is filled (:func:`populate_pages`), not faulted one by one.

A local folder's reads run on torch's intra-op threads (:mod:`checkpointer.runtime.parallel`),
each over a run of the plan's items in file order with about the same bytes: filling fresh
pages from the page cache is work for every core a rank owns.
"""

from __future__ import annotations

import math
import os

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from checkpointer.format.box_runs import box_byte_runs
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.format.safetensors import TensorEntry
from checkpointer.format.tensor_io import populate_pages, row_views, tensor_bytes
from checkpointer.runtime.failpoints import failpoint
from checkpointer.runtime.parallel import in_even_runs


class _Scratch:
    """A reusable buffer for blocks that cannot be read in place; it grows to the largest asked for."""

    def __init__(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)

    def block(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` and ``dtype`` in the buffer (valid until the next call)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._bytes.numel() < nbytes:
            self._bytes = torch.empty(0, dtype=torch.uint8)  # free the old one before the bigger one
            self._bytes = torch.empty(nbytes, dtype=torch.uint8)
        return self._bytes[:nbytes].view(dtype).view(shape)


class SafetensorsReader(StorageReader):
    """Reads the tensors of :class:`CheckpointFiles` for DCP, by byte range."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self.bytes_read = 0

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.bytes_read = 0

    def read_metadata(self, *args, **kwargs) -> Metadata:
        state_dict_metadata = {
            name: TensorStorageMetadata(
                TensorProperties(dtype=entry.dtype),
                torch.Size(entry.shape),
                [ChunkStorageMetadata(torch.Size([0] * len(entry.shape)), torch.Size(entry.shape))],
            )
            for name, entry in self.files.tensors.items()
        }
        return Metadata(state_dict_metadata, storage_data=self.files)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        failpoint("load:read")
        tensors = self.files.tensors
        ordered = sorted(plan.items, key=lambda i: (tensors[i.storage_index.fqn].file, tensors[i.storage_index.fqn].start, i.storage_offsets))
        threads = None if self.files.folder.concurrent_reads else 1
        try:
            sizes = [math.prod(i.lengths) for i in ordered]
            self.bytes_read += sum(in_even_runs(lambda part: self._read_items(part, planner), ordered, sizes, threads))
        finally:
            self.files.folder.close()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_items(self, items: list[ReadItem], planner: LoadPlanner) -> int:
        """Read ``items`` in order into the planner's targets; the bytes read."""
        scratch, read = _Scratch(), 0
        for item in items:
            target = planner.resolve_tensor(item)
            read += self._read_item(self.files.tensors[item.storage_index.fqn], item, target, scratch)
            planner.commit_tensor(item, target)
        return read

    def _read_item(self, entry: TensorEntry, item: ReadItem, target: torch.Tensor, scratch: _Scratch) -> int:
        """Copy the box ``item`` names from ``entry`` into ``target``: only the box's bytes are read.

        A box of whole rows (or one expert's rows) is one byte range; a column box is one range
        per row (:meth:`Folder.read_runs`: each read on its own locally, ranges near each other
        in one request from a remote folder). Returns the bytes read.
        """
        runs = box_byte_runs(entry, tuple(item.storage_offsets), tuple(item.lengths))
        populate_pages(target)
        rows = row_views(target) if target.dtype == entry.dtype and target.device.type == "cpu" else None
        block = None if rows is not None else scratch.block(tuple(item.lengths), entry.dtype)
        read = self.files.folder.read_runs(entry.file, runs, rows if block is None else [tensor_bytes(block)])
        if block is not None:
            target.copy_(block.view(target.shape))
        return read

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False
