"""Plan items and write results that pickle small: DCP sends them between the ranks at every save.

A save's plans go to the coordinator and back, and its write results go to the coordinator:
for a 300M model that is 183 boxes per rank each way. Pickled as DCP's dataclasses, each box
carries its nested ``TensorProperties``, ``ChunkStorageMetadata`` and ``torch.Size`` objects
(33.7 KB and 1.2 ms to pickle per plan of 183 boxes); these subclasses pickle as the plain
values they are made from (13.8 KB, 0.2 ms) and are rebuilt on arrival with the same fields.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult


@dataclass(frozen=True)
class BoxItem(WriteItem):
    """A WriteItem for one box of a tensor: ``sizes`` elements from ``offsets`` of a tensor of ``shape``."""

    def __reduce__(self) -> tuple[Any, tuple]:
        chunk = self.tensor_data.chunk
        return box_item, (self.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes), tuple(self.tensor_data.size), self.tensor_data.properties.dtype)


def box_item(name: str, offsets: tuple[int, ...], sizes: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype) -> BoxItem:
    """The write item of the box ``offsets``/``sizes`` of tensor ``name`` (of ``shape`` and ``dtype``)."""
    return BoxItem(
        index=MetadataIndex(name, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)), properties=_properties(dtype), size=torch.Size(shape)),
    )


@functools.lru_cache(maxsize=None)
def _properties(dtype: torch.dtype) -> TensorProperties:
    return TensorProperties(dtype=dtype)  # shared by every box of that dtype: DCP only reads it


@dataclass(frozen=True)
class BoxResult(WriteResult):
    """A WriteResult whose ``storage_data`` is plain values (the box's file ranges and their digests)."""

    def __reduce__(self) -> tuple[Any, tuple]:
        return box_result, (self.index.fqn, tuple(self.index.offset or ()), self.size_in_bytes, self.storage_data)


def box_result(name: str, offsets: tuple[int, ...], size: int, storage_data: Any) -> BoxResult:
    """The result of writing ``size`` bytes of the box of tensor ``name`` at ``offsets``."""
    return BoxResult(index=MetadataIndex(name, offsets), size_in_bytes=size, storage_data=storage_data)
