"""Rank functions for tensor parallel, FSDP2 over TP and HSDP (see test_parallelism.py)."""

from __future__ import annotations

import glob

import torch
from dist_workers import _config
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torchtune.models.convert_weights import hf_to_tune

from checkpointer import DistributedHFCheckpointer
from checkpointer.train.fsdp import build_sharded_model, parallel_mesh


def layout(name: str, model_type: str, base: str, out: str, tp: int = 1, replicate: int = 1) -> dict:
    """One scenario: a model of ``model_type`` from ``base`` on a ``(replicate, rest, tp)`` mesh."""
    return {"name": name, "model_type": model_type, "base": str(base), "out": str(out), "tp": tp, "replicate": replicate}


def torchtune_reference(folder: str) -> dict[str, torch.Tensor]:
    """torchtune 0.6.1's own conversion of the transformers-written checkpoint in ``folder``."""
    config = _config(folder)
    state = {k: v for f in sorted(glob.glob(f"{folder}/*.safetensors")) for k, v in load_file(f).items()}
    return hf_to_tune(
        state, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
        dim=config.hidden_size, head_dim=config.head_dim,
    )  # fmt: skip


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _local_bytes(state: dict[str, torch.Tensor]) -> int:
    """What this rank holds, by torch's own account (``to_local``)."""
    locals_ = [v.to_local() if isinstance(v, DTensor) else v for v in state.values()]
    return sum(t.numel() * t.element_size() for t in locals_)


def load_save_load_save(rank: int, world: int, layouts: list[dict]) -> dict:
    """Per layout: load, compare with torchtune's conversion, save, load that (checking its digests) into a fresh model, save again."""
    results = {}
    for c in layouts:
        mesh = parallel_mesh("cpu", tensor_parallel_dim=c["tp"], data_parallel_replicate_dim=c["replicate"])
        config = _config(c["base"])
        model = build_sharded_model(c["model_type"], config, mesh)
        checkpointer = DistributedHFCheckpointer(c["base"], f"{c['out']}/first", c["model_type"])
        checkpointer.load_model(model)
        state = model.state_dict()
        reference = torchtune_reference(c["base"])
        saved = checkpointer.save_checkpoint({"model": state}, epoch=0)
        again = build_sharded_model(c["model_type"], config, mesh)
        second = DistributedHFCheckpointer(saved, f"{c['out']}/second", c["model_type"], verify_checksums=True)
        second.load_model(again)
        resaved = second.save_checkpoint({"model": again.state_dict()}, epoch=0)
        results[c["name"]] = {
            "mismatched": sorted(k for k, v in state.items() if not torch.equal(_full(v), reference[k])),
            "missing": sorted(set(reference) - set(state)),
            "placements": {k: str(v.placements) for k, v in state.items() if isinstance(v, DTensor)},
            "local_bytes": _local_bytes(state),
            "bytes_read": checkpointer.last_load.bytes,
            "bytes_written": checkpointer.last_save.bytes,
            "resaved_written": second.last_save.bytes,
            "saved": saved,
            "resaved": resaved,
        }
    return results


def strided_round_trip(rank: int, world: int, base: str, out: str) -> dict:
    """Load and save DTensors laid out ``(Shard(0), _StridedShard(0, split_factor=2))`` on a 2 x 2 mesh.

    Unlike FSDP2 over TP, this layout gives each rank rows that are not consecutive (torch's own
    example: rows 0 and 2 of 8 on rank 0): several boxes per tensor.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from checkpointer.dcp.hf_io import read_hf_tensors
    from checkpointer.mapping.local_shards import local_boxes

    mesh = init_device_mesh("cpu", (2, 2))
    reference = torchtune_reference(base)
    strided = [Shard(0), _StridedShard(0, split_factor=2)]
    state = {k: distribute_tensor(v, mesh, strided if v.dim() == 2 else [Replicate(), Replicate()]) for k, v in reference.items()}
    for value in state.values():
        value.to_local().zero_()
    checkpointer = DistributedHFCheckpointer(base, out, "LLAMA3")
    read_hf_tensors(state, checkpointer.base_files(), checkpointer.key_map, None)
    return {
        "mismatched": sorted(k for k, v in state.items() if not torch.equal(v.full_tensor(), reference[k])),
        "boxes": max(len(local_boxes(k, v)) for k, v in state.items()),
        "saved": checkpointer.save_checkpoint({"model": state}, epoch=0),
    }
