"""Copying a state dict's local shards into reusable buffers, so a save can finish in the background.

Only this rank's data is copied (the local tensor of each DTensor); each staged DTensor
keeps its mesh, placements and global shape, so the planners see the same boxes. The
buffers, and the DTensors around them, are made once per key and reused by every later
save (pinned when the source is on an accelerator).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from checkpointer.mapping.local_shards import dtensor_like


class StagingBuffers:
    """Reusable CPU copies of a state dict's local shards."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._staged: dict[str, DTensor] = {}  # path -> its current buffer as a DTensor

    def stage(self, value: Any) -> Any:
        """A copy of ``value`` whose tensors live in this object's buffers (containers rebuilt, others deep-copied)."""
        with torch.no_grad():
            staged = self._stage(value, "")
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies are done before training changes the sources
        return staged

    def _stage(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(path, value)
        if isinstance(value, dict):
            return {k: self._stage(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._stage(v, f"{path}/{i}") for i, v in enumerate(value))
        return copy.deepcopy(value)

    def _tensor(self, path: str, value: torch.Tensor) -> torch.Tensor:
        local = value.to_local() if isinstance(value, DTensor) else value
        buffer = self._buffer(path, local)
        buffer.copy_(local, non_blocking=True)
        return self._as_dtensor(path, value, buffer) if isinstance(value, DTensor) else buffer

    def _buffer(self, path: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            pin = like.device.type != "cpu" and torch.cuda.is_available()
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
            self._buffers[path] = buffer
            self._staged.pop(path, None)  # it wrapped the old buffer
        return buffer

    def _as_dtensor(self, path: str, value: DTensor, buffer: torch.Tensor) -> DTensor:
        """``buffer`` as the local shard of a DTensor laid out as ``value`` (reused while buffer and layout stay)."""
        staged = self._staged.get(path)
        if staged is None or not _same_layout(staged, value):
            staged = self._staged[path] = dtensor_like(value, buffer)
        return staged


def _same_layout(a: DTensor, b: DTensor) -> bool:
    return a.device_mesh is b.device_mesh and a.placements == b.placements and a.shape == b.shape and a.stride() == b.stride()
