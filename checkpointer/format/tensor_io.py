"""Whole tensors and their bytes in safetensors files, in one process: byte views, reads, pre-sized files, pwritev.

The DCP storage plug-ins (:mod:`checkpointer.dcp`) and the command line both build on these.
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpointer.errors import CheckpointMismatchError
from checkpointer.format.file_layout import FileLayout
from checkpointer.format.folder import Folder
from checkpointer.format.safetensors import TensorEntry
from checkpointer.format.vectored import pwritev_all
from checkpointer.runtime.pages import populate_for_write


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def memory_span(tensor: torch.Tensor) -> tuple[int, int]:
    """The address and length of the memory a strided CPU tensor's elements lie in (first to last byte)."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), (last + 1) * tensor.element_size()


def populate_pages(tensor: torch.Tensor) -> None:
    """Fault in a CPU tensor's pages in one call before a read fills it (:func:`populate_for_write`); others are left alone."""
    if tensor.device.type == "cpu":
        populate_for_write(*memory_span(tensor))


def read_tensor(folder: Folder, entry: TensorEntry) -> torch.Tensor:
    """One whole tensor, read from its byte range straight into a new CPU tensor (one process)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    folder.read_into(entry.file, entry.start, [tensor_bytes(tensor)])
    return tensor


def create_files(folder: Path, file_layout: FileLayout) -> None:
    """Create each file with its header, at its final size (the data is filled in by the ranks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, header in file_layout.headers.items():
        with open(folder / name, "wb") as f:
            f.write(header)
            f.truncate(file_layout.sizes[name])


def write_tensor(fd: int, entry: TensorEntry, tensor: torch.Tensor) -> int:
    """``pwrite`` a whole tensor, converted to ``entry``'s dtype, at its offset in an open file (from :func:`create_files`)."""
    if tuple(tensor.shape) != entry.shape:
        raise CheckpointMismatchError(f"{entry.file}: tensor {entry.name!r} has shape {tuple(tensor.shape)}, its header says {entry.shape}", file=entry.file, key=entry.name)
    return pwritev_all(fd, byte_runs(tensor.detach().to(device="cpu", dtype=entry.dtype)), entry.start)


def byte_runs(tensor: torch.Tensor) -> list[memoryview]:
    """The bytes of ``tensor`` in row-major order, as few contiguous pieces of its memory as possible.

    Its :func:`row_views` where it has them (e.g. a transposed block of heads, one piece per
    row); anything else is copied into one contiguous piece.
    """
    rows = row_views(tensor)
    return rows if rows is not None else [tensor_bytes(tensor.contiguous())]


def row_views(tensor: torch.Tensor) -> list[memoryview] | None:
    """Writable views of ``tensor``'s memory holding its bytes in row-major order, or None where its rows are not contiguous.

    A contiguous tensor is one view; one whose rows (last dimension) are contiguous but
    scattered is one view per row. Rows that share memory (a broadcast view) have none.
    """
    if tensor.is_contiguous():
        return [tensor_bytes(tensor)]
    if tensor.dim() < 2 or tensor.stride(-1) != 1 or any(n > 1 and s == 0 for n, s in zip(tensor.shape, tensor.stride())):
        return None
    storage = memoryview(torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy())
    row_bytes = tensor.shape[-1] * tensor.element_size()
    starts = torch.full(tensor.shape[:-1], tensor.storage_offset(), dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(tensor.shape[:-1], tensor.stride()[:-1])):
        starts += (torch.arange(size, dtype=torch.int64) * stride).view([-1 if d == dim else 1 for d in range(starts.dim())])
    return [storage[s : s + row_bytes] for s in (starts.flatten() * tensor.element_size()).tolist()]
