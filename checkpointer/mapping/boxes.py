"""Boxes of a tensor (offsets and sizes along every dim) and the exact-cover check.

Any shard layout (FSDP2 row ranges, tensor-parallel column blocks, replicas) reduces to
boxes; a save is valid only when its boxes tile each tensor: inside its bounds, no two
overlapping, and together as many elements as the tensor (so no holes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """``sizes`` elements along each dim, starting at ``offsets``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def inside(self, shape: tuple[int, ...]) -> bool:
        return len(self.offsets) == len(shape) == len(self.sizes) and all(
            0 <= o and o + s <= d for o, s, d in zip(self.offsets, self.sizes, shape)
        )

    def overlaps(self, other: Box) -> bool:
        """Whether the two boxes share an element (an empty box shares none)."""
        return all(
            a < b + bs and b < a + s_ and s_ > 0 and bs > 0
            for a, s_, b, bs in zip(self.offsets, self.sizes, other.offsets, other.sizes)
        )


def exact_cover(boxes: list[Box], shape: tuple[int, ...]) -> bool:
    """Whether ``boxes`` cover every element of a tensor of ``shape`` exactly once.

    A sweep along dim 0: sorted by first row, each box is compared only with the earlier
    boxes that still reach its first row (for row ranges: none or one), so the check is
    exact, like DCP's all-pairs plan validation, without being quadratic in the usual case.
    """
    if any(not box.inside(shape) for box in boxes) or sum(box.numel for box in boxes) != math.prod(shape):
        return False
    if not shape:
        return True  # one scalar box: the element count says so
    open_boxes: list[Box] = []
    for box in sorted((b for b in boxes if b.numel), key=lambda b: b.offsets[0]):
        open_boxes = [other for other in open_boxes if other.offsets[0] + other.sizes[0] > box.offsets[0]]
        if any(box.overlaps(other) for other in open_boxes):
            return False
        open_boxes.append(box)
    return True
