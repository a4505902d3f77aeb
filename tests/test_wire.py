"""The plan items and write results a save sends between ranks arrive equal to what was sent, and smaller."""

from __future__ import annotations

import pickle
from dataclasses import asdict

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from checkpointer.dcp.wire import box_item, box_result

BOXES = [("model.layers.0.self_attn.q_proj.weight", (512, 0), (512, 1024), (1024, 1024), torch.bfloat16), ("lm_head.weight", (0, 64), (8, 64), (8, 128), torch.float32), ("scale", (), (), (), torch.float16)]


def _dcp_item(name, offsets, sizes, shape, dtype) -> WriteItem:
    chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
    return WriteItem(MetadataIndex(name, torch.Size(offsets)), WriteItemType.SHARD, tensor_data=TensorWriteData(chunk, TensorProperties(dtype=dtype), torch.Size(shape)))


def test_box_items_arrive_equal_to_dcps_own_and_pickle_smaller():
    ours, dcps = SavePlan([box_item(*box) for box in BOXES]), SavePlan([_dcp_item(*box) for box in BOXES])
    arrived = pickle.loads(pickle.dumps(ours))
    assert [asdict(i) for i in arrived.items] == [asdict(i) for i in dcps.items]  # every field, nested ones too
    assert [i.tensor_storage_size() for i in arrived.items] == [i.tensor_storage_size() for i in dcps.items]
    assert len(pickle.dumps(ours)) < len(pickle.dumps(dcps)) / 2


def test_box_results_arrive_equal_to_dcps_own():
    ranges = [("model-00001-of-00002.safetensors", 4096, 1024, "0" * 32)]
    ours = [box_result(name, offsets, 1024, ranges) for name, offsets, *_ in BOXES]
    dcps = [WriteResult(MetadataIndex(name, torch.Size(offsets)), 1024, ranges) for name, offsets, *_ in BOXES]
    assert [asdict(r) for r in pickle.loads(pickle.dumps(ours))] == [asdict(r) for r in dcps]
