"""Training-loop pieces whose state makes a resume exact on any number of ranks.

The data order is defined globally: each epoch is a seeded permutation of the dataset,
cut into global batches of ``global_batch_size`` examples; rank ``r`` of ``W`` takes its
contiguous share of each global batch, in micro-batches of at most ``batch_size`` (every
rank runs the same number of micro-batches). So the
examples of optimizer step ``k`` do not depend on ``W``, and the position in the data is
just ``(epoch, step)``. Gradients are normalized by the global number of loss tokens, so a
step's update is the same (up to float summation order) on any ``W``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from checkpointer.errors import CheckpointArgumentError
from checkpointer.runtime.distributed import is_distributed


@dataclass
class TrainingProgress:
    """Where training is: epoch, optimizer steps done in it, steps done in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    seed: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class GlobalBatches:
    """This rank's micro-batches (lists of dataset indices) for each optimizer step of an epoch."""

    def __init__(self, dataset_size: int, global_batch_size: int, batch_size: int, rank: int, world: int, seed: int):
        if global_batch_size < world:
            raise CheckpointArgumentError(f"global_batch_size {global_batch_size} is smaller than the {world} ranks", key="global_batch_size")
        if dataset_size < global_batch_size:
            raise CheckpointArgumentError(f"the dataset has {dataset_size} examples, fewer than one global batch of {global_batch_size}", key="global_batch_size")
        self.dataset_size, self.global_batch_size, self.batch_size = dataset_size, global_batch_size, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self._cached_order: tuple[int | None, torch.Tensor] = (None, torch.empty(0, dtype=torch.long))

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch_size

    def step_indices(self, epoch: int, step: int) -> list[int]:
        """This rank's share of global batch ``step`` of ``epoch``."""
        return self._share(epoch, step).tolist()

    def _share(self, epoch: int, step: int) -> torch.Tensor:
        batch = self._order(epoch)[step * self.global_batch_size : (step + 1) * self.global_batch_size]
        return torch.tensor_split(batch, self.world)[self.rank]

    def _order(self, epoch: int) -> torch.Tensor:
        """The seeded permutation of ``epoch``, drawn once per epoch rather than at every step."""
        if self._cached_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached_order = (epoch, torch.randperm(self.dataset_size, generator=generator))
        return self._cached_order[1]

    @property
    def micro_batches_per_step(self) -> int:
        """The same on every rank (FSDP2 needs every rank to run the same forwards)."""
        largest_share = -(-self.global_batch_size // self.world)
        return -(-largest_share // self.batch_size)

    def micro_batches(self, epoch: int, step: int) -> list[list[int]]:
        """This rank's share in ``micro_batches_per_step`` lists (an empty one means: run a no-loss batch)."""
        mine = self._share(epoch, step)
        return [chunk.tolist() for chunk in torch.tensor_split(mine, self.micro_batches_per_step)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, list[list[int]]]]:
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.micro_batches(epoch, step)


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all ranks (itself without a process group)."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


@torch.no_grad()
def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients on several meshes (tensor parallel beside FSDP2).

    torch's foreach norm refuses DTensors of different meshes; here each gradient's norm is
    reduced over its own mesh (``full_tensor``), then the total scales every gradient as torch does.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    squares = [g.norm(2) ** 2 for g in grads]
    total = torch.stack([s.full_tensor() if isinstance(s, DTensor) else s for s in squares]).sum().sqrt() if squares else torch.tensor(0.0)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()  # one host sync, not one per gradient
    for g in grads:
        g.mul_(coefficient)
    return total


@torch.no_grad()
def scale_gradients(model: nn.Module, factor: float) -> None:
    """Multiply every gradient by ``factor`` (e.g. ``world_size / global_loss_tokens``)."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.mul_(factor)
