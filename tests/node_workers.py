"""A torchrun script for simulated nodes (see checkpointer.testing.nodes): load, one step, save, or resume.

``python node_workers.py MODE BASE OUT RESULTS [OPTIONS_JSON]`` on every rank:
- ``save``: load BASE, take one AdamW step on a fixed batch, save ``epoch_0`` with training state
  (FSDP2 over tensor parallel with the option ``tensor_parallel``);
- ``resume``: resume from OUT (weights and optimizer).
A fault test hangs some ranks in the save with ``CHECKPOINTER_FAILPOINT`` and kills a node once
``RESULTS/saving-R`` appears.
Each rank writes ``RESULTS/rank-R.json``: digests of the full weights and optimizer moments,
bytes it sent and received, or the error it raised.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from checkpointer import DistributedHFCheckpointer
from checkpointer.format.model_config import ModelConfig
from checkpointer.train.fsdp import build_sharded_model, default_mesh, parallel_mesh

MODEL_TYPE = "LLAMA3"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the full (gathered) tensors, in key order: the same on any sharding."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if isinstance(full, torch.Tensor):
            h.update(key.encode())
            h.update(full.detach().contiguous().view(torch.uint8).numpy().tobytes() if full.dim() else full.reshape(1).numpy().tobytes())
    return h.hexdigest()


def optimizer_digest(model, optimizer) -> str:
    state = get_optimizer_state_dict(model, optimizer)["state"]
    return digest({f"{k}.{m}": v for k, entry in state.items() for m, v in entry.items() if m != "step"})


def main(mode: str, base: str, out: str, results: str, options: str = "{}") -> None:
    kwargs = json.loads(options)
    config_dir = kwargs.pop("config_dir")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=kwargs.pop("pg_timeout_s", 120)))
    me = dist.get_rank()
    report: dict = {"rank": me}
    try:
        config = ModelConfig.from_json(Path(config_dir, "config.json").read_text())
        tensor_parallel = kwargs.pop("tensor_parallel", 1)
        mesh = parallel_mesh("cpu", tensor_parallel_dim=tensor_parallel) if tensor_parallel > 1 else default_mesh()
        model = build_sharded_model(MODEL_TYPE, config, mesh)
        checkpointer = DistributedHFCheckpointer(base, out, MODEL_TYPE, resume_from_checkpoint=mode == "resume", **kwargs)
        checkpointer.load_model(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if mode == "resume":
            state = checkpointer.load_training_state({"optimizer": get_optimizer_state_dict(model, optimizer), "progress": {"step": -1}})
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
            report["progress"] = state["progress"]
        else:
            tokens = torch.arange(16).reshape(2, 8) % config.vocab_size
            model(tokens).float().pow(2).mean().backward()
            optimizer.step()
            Path(results, f"saving-{me}").write_text("1")  # a fault test kills a node once it sees this
            state = {"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, optimizer), "progress": {"step": 1}}
            report["saved"] = checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
            report["traffic"] = vars(checkpointer.last_network)
        report["weights"] = digest(model.state_dict())
        report["optimizer"] = optimizer_digest(model, optimizer)
    except Exception as e:  # noqa: BLE001 - the test reads every rank's error
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
        report["failed_at"] = time.time()
    Path(results, f"rank-{me}.json").write_text(json.dumps(report))
    if "error" not in report:
        dist.barrier()
        dist.destroy_process_group()
    else:
        time.sleep(3)  # let the other ranks record their errors before torchrun stops them
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])


def save_on_one_node(rank: int, world: int, base: str, out: str) -> dict:
    """For run_on_ranks (one machine, one file system): load, save with training state; what travelled."""
    config = ModelConfig.from_json(Path(base, "config.json").read_text())
    model = build_sharded_model(MODEL_TYPE, config, default_mesh())
    checkpointer = DistributedHFCheckpointer(base, out, MODEL_TYPE)
    checkpointer.load_model(model)
    checkpointer.save_checkpoint({"model": model.state_dict(), "progress": {"step": 0}}, epoch=0, intermediate_checkpoint=True)
    return {"sent": checkpointer.last_network.sent, "received": checkpointer.last_network.received, "nodes": len(checkpointer._saver.staging_nodes[out].groups)}
