"""Rank functions for the async-save tests."""

from __future__ import annotations

import os

import torch
from dist_workers import _config

from checkpointer import CheckpointError, DistributedHFCheckpointer
from checkpointer.runtime.failpoints import ENV
from checkpointer.train.fsdp import build_sharded_model, default_mesh


def _loaded(base: str, out: str, model_type: str, device: str = "cpu"):
    model = build_sharded_model(model_type, _config(base), default_mesh(device), device=device)
    checkpointer = DistributedHFCheckpointer(base, out, model_type, async_save=True)
    checkpointer.load_model(model)
    return model, checkpointer


def save_in_background_while_training(rank: int, world: int, base: str, out: str, model_type: str, device: str = "cpu") -> dict:
    """Two async saves with the weights changed right after each call returns, then a plain save (model on ``device``)."""
    model, checkpointer = _loaded(base, out, model_type, device)
    first = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    blocked = checkpointer.last_blocked_seconds
    with torch.no_grad():  # "the next training steps", while epoch_0 is still being written
        for parameter in model.parameters():
            parameter.mul_(2)
    second = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1)  # waits for the first
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)
    checkpointer.wait()
    full = checkpointer.last_save.seconds
    third = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=2, async_save=False)
    return {"paths": [first, second, third], "blocked": blocked, "full": full}


def background_error_surfaces(rank: int, world: int, base: str, out: str, model_type: str) -> str:
    """A background save that fails on one rank: the next call raises, on every rank."""
    model, checkpointer = _loaded(base, out, model_type)
    os.environ[ENV] = "save:write@1:raise"
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)  # returns: the failure is later
    try:  # the next save first waits for this one, and raises its error before starting
        checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1)
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def stage_shards_of_a_gpu_mesh(rank: int, world: int) -> dict:
    """Stage, change the source, stage again: a DTensor whose mesh is a GPU's and whose shard is in host memory
    (how a GPU shard's pinned copy looks), so the staging path of a GPU model runs on any machine."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    from checkpointer.dcp.staging import StagingBuffers

    mesh = DeviceMesh("cuda", torch.arange(world), _init_backend=False)  # no CUDA needed while nothing is sent
    local = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(torch.Size([2 * world, 3]), (3, 1), local.dtype))
    source = DTensor(local, spec, requires_grad=False)
    staging = StagingBuffers()
    first = staging.stage({"w": source})["w"]
    first_values = first.to_local().clone()
    local.mul_(2)  # "the training steps" after the first save returned
    second = staging.stage({"w": source})["w"]
    return {
        "first": first_values,
        "second": second.to_local().clone(),
        "source": local.clone(),
        "same_buffer": first.to_local().data_ptr() == second.to_local().data_ptr() != local.data_ptr(),
        "layout": (second.device_mesh.device_type, tuple(second.shape), str(second.placements)),
    }
