"""A DCP StorageReader over the safetensors files of a Hugging Face checkpoint.

It reads exactly the byte ranges that the load plan names. When the destination is a
contiguous tensor of the file's dtype the bytes go straight into it; otherwise they go
through a buffer of one block and ``copy_`` converts dtype and scatters into the view.
One buffer serves every block of a load (it grows to the largest), so its pages are
faulted in once rather than once per block.
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

from checkpointer.format.folder import Folder
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.format.safetensors import TensorEntry
from checkpointer.runtime.failpoints import failpoint


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def read_tensor(folder: Folder, entry: TensorEntry) -> torch.Tensor:
    """One whole tensor, read from its byte range straight into a new CPU tensor (one process)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    folder.read_into(entry.file, entry.start, tensor_bytes(tensor))
    return tensor


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
        scratch = _Scratch()
        try:
            for item in ordered:
                target = planner.resolve_tensor(item)
                self._read_item(tensors[item.storage_index.fqn], item, target, scratch)
                planner.commit_tensor(item, target)
        finally:
            self.files.folder.close()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_item(self, entry: TensorEntry, item: ReadItem, target: torch.Tensor, scratch: _Scratch) -> None:
        """Copy the box ``item`` names from ``entry`` into ``target``."""
        rows = item.lengths[0] if item.lengths else 1
        first_row = item.storage_offsets[0] if item.storage_offsets else 0
        offset = entry.contiguous_box(tuple(item.storage_offsets), tuple(item.lengths))
        if offset is not None:  # one run of bytes: read it as is
            if target.dtype == entry.dtype and target.is_contiguous() and target.device.type == "cpu":
                self.files.folder.read_into(entry.file, offset, tensor_bytes(target))
                self.bytes_read += target.numel() * target.element_size()
                return
            block = scratch.block(tuple(item.lengths), entry.dtype)
            self.files.folder.read_into(entry.file, offset, tensor_bytes(block))
            self.bytes_read += block.numel() * block.element_size()
            target.copy_(block.view(target.shape))
            return
        offset = entry.start + first_row * entry.row_bytes
        block = scratch.block((rows, *entry.shape[1:]) if entry.shape else (), entry.dtype)
        self.files.folder.read_into(entry.file, offset, tensor_bytes(block))
        self.bytes_read += block.numel() * block.element_size()
        for dim, (start, length) in enumerate(zip(item.storage_offsets[1:], item.lengths[1:]), start=1):
            block = block.narrow(dim, start, length)
        target.copy_(block.reshape(target.shape) if block.is_contiguous() else block.contiguous().view(target.shape))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False
