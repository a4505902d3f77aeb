"""Saving a model at several steps, for tests of what pruning keeps."""

from __future__ import annotations

import torch

from checkpointer import DistributedHFCheckpointer


def save_steps(checkpointer: DistributedHFCheckpointer, model: torch.nn.Module, steps: list[int] | tuple[int, ...]) -> list[str]:
    """Save epoch 0 at each of ``steps``, the weights changed before each save; the published paths or URLs."""
    published = []
    for step in steps:
        with torch.no_grad():
            model.norm.scale.add_(1.0)
        published.append(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0, step=step))
    return published
