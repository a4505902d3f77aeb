"""Rank functions for the crash-safety tests: a good checkpoint, then a save that a failpoint breaks."""

from __future__ import annotations

import os
import time

import torch

from checkpointer import CheckpointError, DistributedHFCheckpointer
from checkpointer.failpoints import ENV
from checkpointer.fsdp import build_sharded_model, default_mesh
from checkpointer.model_config import ModelConfig


def _model(base: str, model_type: str):
    config = ModelConfig.from_json(open(f"{base}/config.json").read())
    return build_sharded_model(model_type, config, default_mesh())


def save_then_break(rank: int, world: int, base: str, out: str, model_type: str, spec: str) -> dict:
    """Save step_2 (with training state), then try step_4 with failpoint ``spec`` armed."""
    model = _model(base, model_type)
    checkpointer = DistributedHFCheckpointer(base, out, model_type)
    checkpointer.load_model(model)
    checkpointer.save_checkpoint({"model": model.state_dict(), "progress": {"step": 2}}, epoch=0, intermediate_checkpoint=True, step=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2)
    os.environ[ENV] = spec
    started = time.perf_counter()
    try:
        checkpointer.save_checkpoint({"model": model.state_dict(), "progress": {"step": 4}}, epoch=0, intermediate_checkpoint=True, step=4)
        return {"error": None, "seconds": time.perf_counter() - started}
    except CheckpointError as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started}


def load_then_break(rank: int, world: int, base: str, out: str, model_type: str, spec: str) -> dict:
    """A load with failpoint ``spec`` armed."""
    model = _model(base, model_type)
    os.environ[ENV] = spec
    started = time.perf_counter()
    try:
        DistributedHFCheckpointer(base, out, model_type).load_model(model)
        return {"error": None, "seconds": time.perf_counter() - started}
    except CheckpointError as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started}


def resume_progress(rank: int, world: int, base: str, out: str, model_type: str) -> dict:
    """What a restarted job resumes from: the checkpoint's name and its saved progress."""
    checkpointer = DistributedHFCheckpointer(base, out, model_type, resume_from_checkpoint=True)
    model = _model(base, model_type)
    checkpointer.load_model(model)
    state = checkpointer.load_training_state({"progress": {"step": -1}})
    return {"name": checkpointer.resume_manifest["name"], "step": state["progress"]["step"]}


def try_to_save(rank: int, world: int, base: str, out: str, model_type: str) -> str:
    """A save; the error message if it is refused."""
    model = _model(base, model_type)
    checkpointer = DistributedHFCheckpointer(base, out, model_type)
    try:
        checkpointer.load_model(model)  # a second job is refused here, before it trains
        return checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"
