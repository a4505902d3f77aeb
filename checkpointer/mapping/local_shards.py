"""The part of a (possibly distributed) tensor that this rank holds, as a box in the global tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from checkpointer.errors import CheckpointArgumentError, CheckpointMismatchError, CheckpointUnsupportedError


@dataclass(frozen=True)
class LocalShard:
    """This rank's tensor ``local`` sits at ``offsets`` inside a tensor of ``global_shape``."""

    local: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]

    @property
    def first_row(self) -> int:
        return self.offsets[0] if self.offsets else 0

    @property
    def rows(self) -> int:
        return self.local.shape[0] if self.local.dim() else 1


def local_shard(key: str, value: object) -> LocalShard:
    """The local box of a plain tensor (all of it) or of a DTensor sharded/replicated by dims."""
    if isinstance(value, DTensor):
        for placement in value.placements:
            if type(placement) not in (Shard, Replicate):
                raise CheckpointUnsupportedError(
                    f"{key}: DTensor placement {placement} is not supported (only Shard and Replicate)",
                    key=key,
                )
        shape, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        local = value.to_local()
        if tuple(local.shape) != tuple(shape):
            raise CheckpointMismatchError(f"{key}: local shard shape {tuple(local.shape)} differs from its DTensor layout {shape}", key=key)
        return LocalShard(local, tuple(offsets), tuple(value.shape))
    if isinstance(value, torch.Tensor):
        return LocalShard(value, (0,) * value.dim(), tuple(value.shape))
    raise CheckpointArgumentError(f"{key}: expected a tensor, found {type(value).__name__}", key=key)


def global_spec(key: str, value: object) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and global shape of a tensor or DTensor; refuses anything else."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointArgumentError(f"state_dict['model'][{key!r}] is a {type(value).__name__}, not a tensor", key=key)
    return value.dtype, tuple(value.shape)


def converted(target: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is saved in: ``target`` for floating-point tensors, else unchanged."""
    return target if target is not None and dtype.is_floating_point else dtype
