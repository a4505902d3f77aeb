"""Whole torchtune tensors that are, byte for byte, one run of a file: views of its memory map.

``load_checkpoint`` hands torchtune the full tensors on every rank. A tensor that needs no
conversion (its elements in file order, in the file's dtype: no RoPE permutation, no experts
apart from one another) is a view of a private, copy-on-write map of its local file instead
of a copy. Nothing is read until the tensor is used, and every rank of a node then shares the
page cache's pages instead of each faulting in fresh memory of its own. The other tensors,
and files that cannot be mapped (remote folders), are read as usual.
"""

from __future__ import annotations

import math

import torch

from checkpointer.format.folder import truncated
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.format.safetensors import TensorEntry
from checkpointer.mapping.key_maps import KeyMap
from checkpointer.mapping.local_shards import LocalShard
from checkpointer.mapping.matching import Specs
from checkpointer.mapping.pieces import Placement, shard_pieces


def file_views(key_map: KeyMap, files: CheckpointFiles, specs: Specs, sources: dict[str, Placement]) -> dict[str, torch.Tensor]:
    """The tensors of ``specs`` (torchtune keys, placed at ``sources``) that are views of their file's map, by key."""
    maps: dict[str, torch.Tensor | None] = {}
    views = {}
    for key, (dtype, shape) in specs.items():
        found = _one_run(key_map, sources[key], files.tensors, dtype, shape)
        if found is None:
            continue
        file, start = found
        if file not in maps:
            mapped = files.folder.mapped(file)
            maps[file] = None if mapped is None else torch.frombuffer(mapped, dtype=torch.uint8)
        if maps[file] is not None:
            views[key] = _view(maps[file], files.folder.describe(file), start, dtype, shape)
    return views


def _one_run(key_map: KeyMap, placement: Placement, tensors: dict[str, TensorEntry], dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[str, int] | None:
    """The file and offset whose bytes are the whole tensor in order, or None (it needs converting).

    That holds when the tensor's pieces tile it in order (no permuted view) and their byte
    runs lie back to back in one file in the tensor's dtype: a tensor stored as it is, a
    part of a fused tensor, or an expert stack whose experts follow one another.
    """
    whole = torch.empty(shape, dtype=dtype, device="meta")
    file, start, filled = "", 0, 0
    for piece in shard_pieces(key_map, placement, LocalShard(whole, (0,) * len(shape), shape)):
        entry = tensors[piece.hf_key]
        offset = entry.contiguous_box(piece.offsets, piece.lengths)
        if offset is None or entry.dtype != dtype or not piece.view.is_contiguous() or piece.view.storage_offset() != filled:
            return None
        if filled == 0:
            file, start = entry.file, offset
        elif (entry.file, offset) != (file, start + filled * dtype.itemsize):
            return None
        filled += piece.view.numel()
    if filled != whole.numel() or filled == 0 or start % dtype.itemsize:
        return None
    return file, start


def _view(file_bytes: torch.Tensor, where: str, start: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` at byte ``start`` of the mapped file ``where``."""
    end = start + math.prod(shape) * dtype.itemsize
    if end > file_bytes.numel():
        raise truncated(where, end, file_bytes.numel())
    return file_bytes[start:end].view(dtype).view(shape)
