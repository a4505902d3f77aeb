"""Copying a state dict's local shards into reusable buffers, so a save can finish in the background.

Only this rank's data is copied (the local tensor of each DTensor); each staged DTensor
keeps its mesh, placements and global shape, so the planners see the same boxes. The
buffers are allocated once per key and reused by every later save (pinned when the
source is on an accelerator).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor


class StagingBuffers:
    """Reusable CPU copies of a state dict's local shards."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, path: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            pin = like.device.type != "cpu" and torch.cuda.is_available()
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
            self._buffers[path] = buffer
        return buffer

    def _tensor(self, path: str, value: torch.Tensor) -> torch.Tensor:
        local = value.to_local() if isinstance(value, DTensor) else value
        buffer = self._buffer(path, local)
        buffer.copy_(local.detach(), non_blocking=True)
        if isinstance(value, DTensor):
            return DTensor.from_local(buffer, value.device_mesh, value.placements, shape=value.shape, stride=value.stride(), run_check=False)
        return buffer

    def stage(self, value: Any, path: str = "") -> Any:
        """A copy of ``value`` whose tensors live in this object's buffers (containers rebuilt, others deep-copied)."""
        if isinstance(value, torch.Tensor):
            staged = self._tensor(path, value)
        elif isinstance(value, dict):
            staged = {k: self.stage(v, f"{path}/{k}") for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            staged = type(value)(self.stage(v, f"{path}/{i}") for i, v in enumerate(value))
        else:
            staged = copy.deepcopy(value)
        if path == "" and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies are done before training changes the sources
        return staged
