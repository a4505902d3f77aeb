"""Building a torchtune model straight into FSDP2 shards: no rank ever holds the full model.

The model is built on the meta device (no memory), each transformer layer and then the
root are wrapped with ``fully_shard``, and only the local shards are materialized with
``to_empty``. The checkpointer then fills them from the files.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torchtune.modules.peft import LoRALinear

from checkpointer.format.model_config import ModelConfig
from checkpointer.runtime.distributed import world_size
from checkpointer.train.builders import LoraSpec, build_model, reset_rope_buffers


def default_mesh(device: str = "cpu") -> DeviceMesh:
    """A 1-D mesh over every rank of the default process group."""
    return init_device_mesh(device, (world_size(),))


def shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """``fully_shard`` each transformer layer, then the root (embeddings, norm, output)."""
    kwargs = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy else {})}
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def build_sharded_model(
    model_type: str,
    config: ModelConfig,
    mesh: DeviceMesh | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: LoraSpec | None = None,
    max_seq_len: int | None = None,
) -> nn.Module:
    """A model of ``model_type`` sharded over ``mesh``, with uninitialized local shards.

    Load weights into it with ``DistributedHFCheckpointer.load_model``.
    """
    mesh = mesh or default_mesh(torch.device(device).type)
    with torch.device("meta"):
        model = build_model(model_type, config, lora=lora, max_seq_len=max_seq_len).to(dtype)
    shard_model(model, mesh)
    model.to_empty(device=device)
    reset_rope_buffers(model, device)
    initialize_lora(model)
    return model


def initialize_lora(model: nn.Module) -> None:
    """LoRA's own initialization (A random, B zero), lost by ``to_empty``; the checkpointer overwrites it on resume."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.initialize_parameters()
