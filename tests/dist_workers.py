"""Functions that run on every rank of a spawned gloo process group (see run_on_ranks)."""

from __future__ import annotations

import torch
from states import differences

from checkpointer import DistributedHFCheckpointer
from checkpointer.errors import CheckpointError
from checkpointer.format.model_config import ModelConfig
from checkpointer.train.fsdp import build_sharded_model, default_mesh


def _config(path: str) -> ModelConfig:
    with open(f"{path}/config.json") as f:
        return ModelConfig.from_json(f.read())


def case(name: str, model_type: str, base: str, out: str, config_dir: str | None = None, **kwargs) -> dict:
    """One load/save case; ``config_dir`` is a local folder with the base's config.json (default: base)."""
    return {"name": name, "model_type": model_type, "base": str(base), "out": str(out), "config": str(config_dir or base), "kwargs": kwargs}


def load_forward_save_reload(rank: int, world: int, cases: list[dict], tokens: torch.Tensor) -> dict:
    """For each case: sharded load, logits, save, then reload what was published into a fresh model."""
    mesh = default_mesh()
    results = {}
    for c in cases:
        config = _config(c["config"])
        model = build_sharded_model(c["model_type"], config, mesh)
        checkpointer = DistributedHFCheckpointer(c["base"], c["out"], c["model_type"], **c["kwargs"])
        checkpointer.load_model(model)
        with torch.no_grad():
            logits = model(tokens)
        saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
        again = build_sharded_model(c["model_type"], config, mesh)
        DistributedHFCheckpointer(saved, c["out"], c["model_type"], **c["kwargs"]).load_model(again)
        results[c["name"]] = {
            "logits": logits,
            "saved": saved,
            "bitwise": not differences(model.state_dict(), again.state_dict()),
            "bytes_read": checkpointer.last_load.bytes,
            "bytes_written": checkpointer.last_save.bytes,
        }
    return results


def load_only(rank: int, world: int, cases: list[dict], tokens: torch.Tensor) -> dict:
    """For each case: sharded load and logits, plus the bytes this rank read."""
    mesh = default_mesh()
    results = {}
    for c in cases:
        model = build_sharded_model(c["model_type"], _config(c["config"]), mesh)
        checkpointer = DistributedHFCheckpointer(c["base"], c["out"], c["model_type"], **c["kwargs"])
        checkpointer.load_model(model)
        with torch.no_grad():
            results[c["name"]] = {"logits": model(tokens), "bytes_read": checkpointer.last_load.bytes}
    return results


def load_expecting_errors(rank: int, world: int, cases: list[dict]) -> dict:
    """For each case: the error message load_model raises ("no error" if none)."""
    mesh = default_mesh()
    messages = {}
    for c in cases:
        model = build_sharded_model(c["model_type"], _config(c["config"]), mesh)
        try:
            DistributedHFCheckpointer(c["base"], c["out"], c["model_type"], **c["kwargs"]).load_model(model)
            messages[c["name"]] = "no error"
        except CheckpointError as e:
            messages[c["name"]] = f"{type(e).__name__}: {e}"
    return messages


def save_dcp(rank: int, world: int, base: str, model_type: str, out: str) -> None:
    """What torchtune's DistributedCheckpointer writes: ``dcp.save`` of the sharded state (pickled metadata)."""
    import torch.distributed.checkpoint as dcp

    model = build_sharded_model(model_type, _config(base), default_mesh())
    DistributedHFCheckpointer(base, f"{out}-unused", model_type).load_model(model)
    dcp.save({"model": model.state_dict(), "epochs_run": 1}, checkpoint_id=out)


def rank_zero_asks_before_and_after_open(rank: int, world: int, base: str, out: str, model_type: str) -> dict:
    """Only rank 0 reads ``resuming``, first before ``open()`` (an error, not a hang), then after it (an answer)."""
    import torch.distributed as dist

    checkpointer = DistributedHFCheckpointer(base, out, model_type, resume_from_checkpoint=True)
    before = None
    if rank == 0:
        try:
            checkpointer.resuming
        except CheckpointError as e:
            before = str(e)
    checkpointer.open()
    answer = {}
    if rank == 0 and checkpointer.resuming:  # what deadlocked when resuming ran a collective
        answer = {"name": checkpointer.resume_manifest["name"], "num_layers": checkpointer.config_dict["num_hidden_layers"]}
    dist.barrier()
    return {"before": before, "answer": answer}
