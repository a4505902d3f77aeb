"""Boxes of a tensor in its safetensors file: byte runs, and the writer that writes column boxes as what they are."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType

from checkpointer.dcp.storage_writer import SafetensorsWriter
from checkpointer.errors import CheckpointError
from checkpointer.format.box_runs import box_byte_runs, strided_runs
from checkpointer.format.file_layout import layout_files
from checkpointer.format.safetensors import TensorEntry, TensorSpec

BOXES = {  # (shape, offsets, sizes)
    "whole rows": ((6, 4), (2, 0), (3, 4)),
    "column block": ((6, 4), (0, 2), (6, 2)),
    "inner block": ((6, 4), (1, 1), (4, 2)),
    "3-d, whole trailing dims": ((3, 4, 5), (1, 0, 0), (2, 4, 5)),
    "3-d, middle rows": ((3, 4, 5), (0, 1, 0), (3, 2, 5)),
    "3-d, last dim split": ((3, 4, 5), (1, 1, 2), (2, 3, 3)),
    "1-d": ((10,), (3,), (5,)),
    "scalar": ((), (), ()),
}


@pytest.mark.parametrize("name", list(BOXES))
def test_box_byte_runs_hold_the_box_in_row_major_order(name):
    shape, offsets, sizes = BOXES[name]
    full = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.int16).reshape(shape)
    data = full.numpy().tobytes()
    start = 8  # as if the tensor's data began after a header
    entry = TensorEntry("t", "f", torch.int16, shape, start, start + len(data))
    box = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
    runs = box_byte_runs(entry, offsets, sizes)
    assert b"".join(data[o - start : o - start + n] for o, n in runs) == box.contiguous().numpy().tobytes()
    whole_rows = not shape or all(s == n for s, n in zip(sizes[1:], shape[1:]))
    if whole_rows:
        assert len(runs) == 1
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))  # touching runs are merged
    strided = strided_runs(runs)
    assert [(start, s.length) for s in strided for start in s.starts()] == runs
    assert all(s.stride > s.length for s in strided if s.count > 1)
    # one strided range, except for a 3-d box that splits its last two dims: one per block of the first
    assert len(strided) == (sizes[0] if name == "3-d, last dim split" else 1)


class _Boxes(SavePlanner):
    """A direct user of the writer: hands it the data of each box it planned."""

    def __init__(self, data: dict[tuple[int, ...], torch.Tensor]):
        self.data = data

    def set_up_planner(self, *args, **kwargs): ...
    def create_local_plan(self): ...
    def create_global_plan(self, plans): ...
    def finish_plan(self, plan): ...

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        return self.data[tuple(item.index.offset)]


def _write(tmp_path, full: torch.Tensor, boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]):
    layout = layout_files({"w": TensorSpec("w", full.dtype, tuple(full.shape))})
    writer = SafetensorsWriter(tmp_path, layout, on_finish=lambda folder: None)
    items = [
        WriteItem(
            index=MetadataIndex("w", torch.Size(offsets)),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)), TensorProperties(full.dtype), full.shape),
        )
        for offsets, sizes in boxes
    ]
    data = {offsets: full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] for offsets, sizes in boxes}
    writer.set_up_storage_writer(True)
    writer.prepare_global_plan([SavePlan(items)])
    writer.write_data(SavePlan(items), _Boxes(data)).wait()
    return tmp_path / next(iter(layout.headers))


def test_column_boxes_are_written_as_columns(tmp_path):
    full = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    file = _write(tmp_path, full, [((0, 0), (4, 2)), ((0, 2), (4, 2))])  # two tensor-parallel ranks' Shard(1) blocks
    assert torch.equal(load_file(file)["w"], full)


def test_a_box_outside_its_tensor_is_refused_before_any_byte_is_written(tmp_path):
    full = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    with pytest.raises(CheckpointError, match=r"'w' of shape \(4, 4\)"):
        _write(tmp_path, full, [((0, 0), (4, 2)), ((0, 3), (4, 2))])
    written = next(tmp_path.glob("*.safetensors"))
    assert torch.equal(load_file(written)["w"], torch.zeros(4, 4))  # not even the valid first box
