"""Rank functions for the crash-safety tests: a good checkpoint, then a save that a failpoint breaks."""

from __future__ import annotations

import os
from typing import Callable

import torch
from dist_workers import _config

from checkpointer import CheckpointError, DistributedHFCheckpointer
from checkpointer.runtime.failpoints import ENV
from checkpointer.train.fsdp import build_sharded_model, default_mesh


def _model(base: str, model_type: str):
    return build_sharded_model(model_type, _config(base), default_mesh())


def _outcome(call: Callable[[], object]) -> dict:
    """Run ``call``: the CheckpointError it raised (None if it returned)."""
    try:
        call()
        error = None
    except CheckpointError as e:
        error = f"{type(e).__name__}: {e}"
    return {"error": error}


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
    return _outcome(
        lambda: checkpointer.save_checkpoint({"model": model.state_dict(), "progress": {"step": 4}}, epoch=0, intermediate_checkpoint=True, step=4)
    )


def load_then_break(rank: int, world: int, base: str, out: str, model_type: str, spec: str) -> dict:
    """A load with failpoint ``spec`` armed."""
    model = _model(base, model_type)
    os.environ[ENV] = spec
    return _outcome(lambda: DistributedHFCheckpointer(base, out, model_type).load_model(model))


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
