"""Comparing state dicts key by key: a key missing on either side is a difference, not skipped."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed.tensor import DTensor


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


def differences(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """What differs between ``a`` and ``b``: keys only one has, then keys whose tensors are not bitwise equal
    (DTensors by their local shards). Empty when they hold the same tensors under the same keys."""
    only = [f"only in the first: {k}" for k in sorted(a.keys() - b.keys())] + [f"only in the second: {k}" for k in sorted(b.keys() - a.keys())]
    return only + [f"differs: {k}" for k in sorted(a.keys() & b.keys()) if not torch.equal(_local(a[k]), _local(b[k]))]
