"""Functions that run on every rank of a spawned gloo process group (see run_on_ranks)."""

from __future__ import annotations

import torch

from checkpointer import DistributedHFCheckpointer
from checkpointer.errors import CheckpointError
from checkpointer.fsdp import build_sharded_model, default_mesh
from checkpointer.model_config import ModelConfig


def _config(path: str) -> ModelConfig:
    with open(f"{path}/config.json") as f:
        return ModelConfig.from_json(f.read())


def load_forward_save_reload(rank: int, world: int, cases: list, tokens: torch.Tensor) -> dict:
    """For each (name, model_type, base, out): sharded load, logits, save, reload into a fresh model."""
    mesh = default_mesh()
    results = {}
    for name, model_type, base, out in cases:
        model = build_sharded_model(model_type, _config(base), mesh)
        checkpointer = DistributedHFCheckpointer(base, out, model_type)
        checkpointer.load_model(model)
        with torch.no_grad():
            logits = model(tokens)
        saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
        again = build_sharded_model(model_type, _config(saved), mesh)
        DistributedHFCheckpointer(saved, out, model_type).load_model(again)
        pairs = zip(model.state_dict().values(), again.state_dict().values())
        results[name] = {
            "logits": logits,
            "saved": saved,
            "bitwise": all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs),
            "bytes_read": checkpointer.last_load.bytes,
            "bytes_written": checkpointer.last_save.bytes,
        }
    return results


def load_expecting_errors(rank: int, world: int, cases: list) -> dict:
    """For each (name, model_type, base, model_config_dir): the error message load_model raises."""
    mesh = default_mesh()
    messages = {}
    for name, model_type, base, config_dir in cases:
        model = build_sharded_model(model_type, _config(config_dir), mesh)
        try:
            DistributedHFCheckpointer(base, f"{base}/out", model_type).load_model(model)
            messages[name] = "no error"
        except CheckpointError as e:
            messages[name] = f"{type(e).__name__}: {e}"
    return messages
