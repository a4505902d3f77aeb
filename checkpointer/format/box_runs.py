"""Where a box of a tensor lies in its safetensors file: contiguous byte runs.

A box (``offsets`` and ``sizes``, one per dim) of a row-major tensor is one byte run when
it is whole rows (FSDP2 and ColwiseParallel shards: dim 0 only), and one run per row when
it splits rows (RowwiseParallel and Colwise embeddings: ``Shard(1)``), with a gap after
each, so a reader or writer issues one call per run, never one per element.
Runs of one length at one spacing (a column box's rows) group into a :class:`Strided`
range, which the manifest records with one digest however many rows it has.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from checkpointer.errors import CheckpointMismatchError
from checkpointer.format.safetensors import TensorEntry

ByteRun = tuple[int, int]  # (absolute file offset, length in bytes)


class Strided(NamedTuple):
    """``count`` runs of ``length`` bytes, the first at ``offset``, each ``stride`` bytes after the one before."""

    offset: int
    length: int
    stride: int
    count: int

    @classmethod
    def one(cls, offset: int, length: int) -> Strided:
        """One run."""
        return cls(offset, length, length, 1)

    @property
    def nbytes(self) -> int:
        return self.length * self.count

    def starts(self) -> Sequence[int]:
        """The file offset of each run."""
        return range(self.offset, self.offset + self.count * self.stride, self.stride) if self.count > 1 else (self.offset,)

    def describe(self) -> str:
        """The bytes in words, for messages."""
        if self.count == 1:
            return f"bytes {self.offset}..{self.offset + self.length}"
        return f"{self.count} runs of {self.length} bytes, {self.stride} apart, from byte {self.offset}"


def strided_runs(runs: list[ByteRun]) -> list[Strided]:
    """``runs`` (in file order, apart) as the fewest :class:`Strided` ranges: consecutive runs of one length at one spacing."""
    grouped: list[Strided] = []
    first = length = stride = count = 0
    for offset, size in runs:
        if count and size == length and (count == 1 or offset == first + count * stride):
            stride = stride if count > 1 else offset - first
            count += 1
            continue
        if count:
            grouped.append(Strided(first, length, stride, count))
        first, length, stride, count = offset, size, size, 1
    if count:
        grouped.append(Strided(first, length, stride, count))
    return grouped


def check_box(entry: TensorEntry, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
    """Refuse a box that does not lie inside ``entry``'s shape, naming the tensor and its file."""
    inside = len(offsets) == len(sizes) == len(entry.shape) and all(
        0 <= o and 0 <= s and o + s <= n for o, s, n in zip(offsets, sizes, entry.shape)
    )
    if not inside:
        raise CheckpointMismatchError(
            f"{entry.file}: a box at offsets {tuple(offsets)} of sizes {tuple(sizes)} does not fit "
            f"tensor {entry.name!r} of shape {entry.shape}",
            file=entry.file,
            key=entry.name,
        )


def box_byte_runs(entry: TensorEntry, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[ByteRun]:
    """The file byte runs of the box, in the box's row-major order (its bytes, back to back)."""
    check_box(entry, offsets, sizes)
    if not entry.shape:
        return [(entry.start, entry.nbytes)]
    if math.prod(sizes) == 0:
        return []
    itemsize = entry.dtype.itemsize
    split = len(sizes) - 1  # dims after ``split`` are whole: each run is contiguous from there on
    while split > 0 and sizes[split] == entry.shape[split]:
        split -= 1
    strides = [math.prod(entry.shape[d + 1 :]) for d in range(len(entry.shape))]
    run_bytes = sizes[split] * strides[split] * itemsize
    if split == 0:  # whole rows (FSDP2 and ColwiseParallel shards, experts): one run
        return [(entry.start + offsets[0] * strides[0] * itemsize, run_bytes)]
    starts = torch.tensor([offsets[split] * strides[split]], dtype=torch.int64)
    for dim in range(split - 1, -1, -1):
        starts = (torch.arange(offsets[dim], offsets[dim] + sizes[dim], dtype=torch.int64) * strides[dim])[:, None] + starts[None, :]
        starts = starts.flatten()
    # dim ``split`` is cut, so a gap follows every run: none touch
    return [(start, run_bytes) for start in (starts * itemsize + entry.start).tolist()]


def merge_runs(runs: list[ByteRun], max_gap: int = 0) -> list[ByteRun]:
    """Consecutive runs whose gap is at most ``max_gap`` bytes, merged into one (gaps included)."""
    merged: list[ByteRun] = []
    for offset, length in runs:
        if merged and 0 <= offset - (merged[-1][0] + merged[-1][1]) <= max_gap:
            merged[-1] = (merged[-1][0], offset + length - merged[-1][0])
        else:
            merged.append((offset, length))
    return merged
