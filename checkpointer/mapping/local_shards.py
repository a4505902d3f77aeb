"""The parts of a (possibly distributed) tensor that this rank holds, as boxes in the global tensor.

Every DTensor layout torch builds is a set of boxes on each rank (DESIGN.md 8): ``Shard(d)``
on any dim, ``Replicate``, uneven shards, and ``_StridedShard`` (FSDP2 over tensor parallel),
on meshes of any number of dims. torch computes, per sharded dim, the global index of every
local position (``_get_shard_size_and_offsets``, the helper behind
``compute_local_shape_and_global_offset``); each maximal run of consecutive indices is one
interval, and a box is one interval per dim. FSDP2 over TP gives one interval per dim; a
strided shard whose rows are not consecutive gives several boxes, never a gathered tensor.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _get_shard_size_and_offsets
from torch.distributed.tensor.placement_types import Placement as DTensorPlacement
from torch.distributed.tensor.placement_types import _StridedShard

from checkpointer.errors import CheckpointArgumentError, CheckpointMismatchError, CheckpointUnsupportedError


@dataclass(frozen=True)
class LocalShard:
    """This rank's tensor ``local`` (a box) sits at ``offsets`` inside a tensor of ``global_shape``."""

    local: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]

    @property
    def first_row(self) -> int:
        return self.offsets[0] if self.offsets else 0

    @property
    def rows(self) -> int:
        return self.local.shape[0] if self.local.dim() else 1


def local_boxes(key: str, value: object) -> list[LocalShard]:
    """The boxes of a plain tensor (one: all of it) or of a DTensor's local tensor (see the module doc)."""
    if isinstance(value, DTensor):
        return _dtensor_boxes(key, value)
    if isinstance(value, torch.Tensor):
        return [LocalShard(value, (0,) * value.dim(), tuple(value.shape))]
    raise CheckpointArgumentError(f"{key}: expected a tensor, found {type(value).__name__}", key=key)


def _dtensor_boxes(key: str, value: DTensor) -> list[LocalShard]:
    local, shape, placements = value.to_local(), tuple(value.shape), tuple(value.placements)
    _check_placements(key, placements)
    mesh = value.device_mesh
    local_shape, per_dim = _layout(shape, placements, tuple(mesh.shape), tuple(mesh.get_coordinate()))
    if tuple(local.shape) != local_shape:
        raise CheckpointMismatchError(f"{key}: local shard shape {tuple(local.shape)} differs from its DTensor layout {value.placements}", key=key)
    if local.numel() == 0:
        return []
    boxes = []
    for box in itertools.product(*per_dim):
        view = local
        for dim, (local_start, _, length) in enumerate(box):
            if length != local_shape[dim]:
                view = view.narrow(dim, local_start, length)
        boxes.append(LocalShard(view, tuple(start for _, start, _ in box), shape))
    return boxes


def _check_placements(key: str, placements: tuple[DTensorPlacement, ...]) -> None:
    for placement in placements:
        if not isinstance(placement, (Replicate, Shard, _StridedShard)):
            raise CheckpointUnsupportedError(
                f"{key}: DTensor placement {placement} holds partial values, not a part of the tensor: "
                "reduce it (redistribute to Replicate or Shard) before saving",
                key=key,
            )


Intervals = tuple[tuple[int, int, int], ...]  # (local start, global start, length) per run of one dim


@functools.lru_cache(maxsize=4096)
def _layout(
    shape: tuple[int, ...], placements: tuple[DTensorPlacement, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[Intervals, ...]]:
    """The local shape and, per dim, the runs of global indices of the shard at ``coordinate`` of a mesh.

    A model's layouts are the same at every load and save, so each is worked out once per process.
    """
    indices: dict[int, torch.Tensor] = {}  # sharded dim -> the global index of each local position (torch's own computation)
    sizes = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        dim = placement.dim
        size, index = _get_shard_size_and_offsets(
            sizes[dim], mesh_shape[mesh_dim], coordinate[mesh_dim], placement, indices.get(dim), shape[dim], False
        )
        sizes[dim], indices[dim] = size, index[:size]
    local_shape = tuple(len(indices[d]) if d in indices else n for d, n in enumerate(shape))
    if not all(local_shape):
        return local_shape, ()
    return local_shape, tuple(tuple(_intervals(indices[d])) if d in indices else ((0, 0, n),) for d, n in enumerate(shape))


def _intervals(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive global indices as (local start, global start, length)."""
    first, count = int(index[0]), len(index)
    if int(index[-1]) - first + 1 == count and bool((index.diff() == 1).all()):
        return [(0, first, count)]
    runs: list[tuple[int, int, int]] = []
    for position, global_index in enumerate(index.tolist()):
        if runs and runs[-1][1] + runs[-1][2] == global_index:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, global_index, 1))
    return runs


def dtensor_like(value: DTensor, local: torch.Tensor) -> DTensor:
    """``local`` as this rank's shard of a DTensor laid out exactly as ``value``: no copy, no collective.

    ``local`` stays on its own device: a pinned host buffer for a GPU shard stays in host memory
    (``DTensor.from_local`` would copy it onto the mesh's device). Same shape and dtype as
    ``value``'s shard.
    """
    shard = value.to_local()
    if local.shape != shard.shape or local.dtype != shard.dtype:
        raise ValueError(f"dtensor_like: a {local.dtype} {tuple(local.shape)} buffer for a {shard.dtype} {tuple(shard.shape)} shard")
    return DTensor(local, value._spec, requires_grad=local.requires_grad)


def global_spec(key: str, value: object) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and global shape of a tensor or DTensor; refuses anything else."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointArgumentError(f"state_dict['model'][{key!r}] is a {type(value).__name__}, not a tensor", key=key)
    return value.dtype, tuple(value.shape)


def converted(target: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is saved in: ``target`` for floating-point tensors, else unchanged."""
    return target if target is not None and dtype.is_floating_point else dtype
