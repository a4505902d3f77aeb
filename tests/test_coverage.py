"""The save plan's coverage check: every element of every tensor written exactly once.

Fast and single-process: boxes against an element-count oracle (a tensor of counters, one
per element) and against DCP's own global-plan validation, then the planner's refusal.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.distributed.checkpoint.default_planner import _validate_global_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from checkpointer.dcp.save_planner import HFSavePlanner
from checkpointer.errors import CheckpointMismatchError
from checkpointer.format.safetensors import TensorSpec
from checkpointer.mapping.boxes import Box, exact_cover

Boxes = list[tuple[tuple[int, ...], tuple[int, ...]]]

# (0,0)+(2,1), (0,1)+(1,1), (1,0)+(1,1): four elements, like a 2x2 tensor, but (1,0) twice and (1,1) never
OVERLAP_PLUS_HOLE: Boxes = [((0, 0), (2, 1)), ((0, 1), (1, 1)), ((1, 0), (1, 1))]


def _counts(boxes: Boxes, shape: tuple[int, ...]) -> torch.Tensor | None:
    """How often each element is written (None when a box leaves the tensor): the oracle."""
    counts = torch.zeros(shape, dtype=torch.int64)
    for offsets, sizes in boxes:
        if any(o < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape)):
            return None
        counts[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] += 1
    return counts


def _is_exact_by_counting(boxes: Boxes, shape: tuple[int, ...]) -> bool:
    counts = _counts(boxes, shape)
    return counts is not None and bool((counts == 1).all())


def _exact(boxes: Boxes, shape: tuple[int, ...]) -> bool:
    return exact_cover([Box(o, s) for o, s in boxes], shape)


def _split(length: int, parts: int, rng: random.Random) -> list[tuple[int, int]]:
    """``length`` cut into ``parts`` (start, size) ranges, some possibly empty."""
    cuts = sorted(rng.randint(0, length) for _ in range(parts - 1))
    edges = [0, *cuts, length]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


def _grid(shape: tuple[int, int], rng: random.Random) -> Boxes:
    """An exact tiling: row ranges (FSDP), each cut into column blocks (tensor parallel)."""
    return [
        ((r, c), (rows, cols))
        for r, rows in _split(shape[0], rng.randint(1, 4), rng)
        for c, cols in _split(shape[1], rng.randint(1, 3), rng)
    ]


def _broken(boxes: Boxes, shape: tuple[int, int], rng: random.Random) -> Boxes:
    """``boxes`` with one box moved, grown or dropped: usually no longer exact."""
    boxes = list(boxes)
    k = rng.randrange(len(boxes))
    (r, c), (rows, cols) = boxes[k]
    change = rng.choice(["shift", "grow", "drop", "duplicate"])
    if change == "shift":
        boxes[k] = ((r + rng.choice([-1, 1]), c), (rows, cols))
    elif change == "grow":
        boxes[k] = ((r, c), (rows, cols + 1))
    elif change == "drop":
        del boxes[k]
    else:
        boxes.append(boxes[k])
    return boxes


def test_the_overlap_plus_hole_case_is_refused_though_the_element_count_matches():
    assert sum(s[0] * s[1] for _, s in OVERLAP_PLUS_HOLE) == 4
    assert not _is_exact_by_counting(OVERLAP_PLUS_HOLE, (2, 2))
    assert not _exact(OVERLAP_PLUS_HOLE, (2, 2))


@pytest.mark.parametrize(
    "boxes,shape",
    [
        ([((0, 0), (2, 1)), ((0, 1), (2, 1))], (2, 2)),  # two column blocks
        ([((0, 0), (1, 2)), ((1, 0), (1, 2))], (2, 2)),  # two row ranges
        ([((0,), (3,)), ((3,), (0,)), ((3,), (5,))], (8,)),  # an empty shard on one rank
        ([((), ())], ()),  # a scalar
    ],
    ids=["columns", "rows", "empty_shard", "scalar"],
)
def test_exact_covers_pass(boxes, shape):
    assert _is_exact_by_counting(boxes, shape)
    assert _exact(boxes, shape)


@pytest.mark.parametrize(
    "boxes,shape",
    [
        ([((0, 0), (2, 1))], (2, 2)),  # a hole
        ([((0, 0), (2, 2)), ((1, 1), (1, 1))], (2, 2)),  # an overlap
        ([((1, 0), (2, 2)), ((0, 0), (1, 2))], (2, 2)),  # the right count, but a box leaves the tensor
        ([((0,), (2,)), ((1,), (2,)), ((3,), (1,))], (4,)),  # rows overlap where the count has room for it
        ([((), ()), ((), ())], ()),  # a scalar written twice
    ],
    ids=["hole", "overlap", "out_of_bounds", "rows_overlap_with_spare_count", "scalar_twice"],
)
def test_holes_overlaps_and_strays_are_refused(boxes, shape):
    assert not _is_exact_by_counting(boxes, shape)
    assert not _exact(boxes, shape)


def test_random_tilings_and_their_breakages_agree_with_counting_and_with_dcp():
    rng = random.Random(11)
    for trial in range(300):
        shape = (rng.randint(1, 9), rng.randint(1, 7))
        boxes = _grid(shape, rng)
        if trial % 2:
            boxes = _broken(boxes, shape, rng)
        expected = _is_exact_by_counting(boxes, shape)
        assert _exact(boxes, shape) == expected, (shape, boxes)
        if _counts(boxes, shape) is not None:  # DCP's own validation of the same plan (bounds, overlaps, volume)
            assert (not _dcp_errors(boxes, shape)) == expected, (shape, boxes)


def _dcp_errors(boxes: Boxes, shape: tuple[int, ...]) -> list[str]:
    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
    metadata = Metadata({"w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)})
    return _validate_global_plan([SavePlan([]), SavePlan([])], metadata)  # two ranks: DCP checks the volume too


def _item(offsets: tuple[int, ...], sizes: tuple[int, ...], shape: tuple[int, ...]) -> WriteItem:
    return WriteItem(
        index=MetadataIndex("w", torch.Size(offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
            properties=TensorProperties(dtype=torch.float32),
            size=torch.Size(shape),
        ),
    )


def _plan(boxes_by_rank: list[Boxes], shape: tuple[int, ...]) -> None:
    planner = HFSavePlanner(key_map=None, specs={"w": TensorSpec("w", torch.float32, shape)}, destinations={})  # type: ignore[arg-type]
    planner.create_global_plan([SavePlan([_item(o, s, shape) for o, s in boxes]) for boxes in boxes_by_rank])


def test_the_planner_refuses_ranks_that_overlap_and_leave_a_hole_and_names_the_tensor():
    with pytest.raises(CheckpointMismatchError, match="w: the ranks' shards cover 4 of its 4 elements") as info:
        _plan([OVERLAP_PLUS_HOLE[:1], OVERLAP_PLUS_HOLE[1:]], (2, 2))
    assert info.value.key == "w" and isinstance(info.value, ValueError)


def test_the_planner_accepts_ranks_that_tile_a_tensor_in_column_blocks():
    _plan([[((0, 0), (2, 1))], [((0, 1), (2, 1))]], (2, 2))
