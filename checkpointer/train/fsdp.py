"""Building a torchtune model straight into its shards: no rank ever holds the full model.

The model is built on the meta device (no memory); with tensor parallelism it is first
parallelized over the mesh's ``tp`` dim (``training.prepare_mha_for_tp`` and a plan, as
torchtune's recipe does); each transformer layer and then the root are wrapped with
``fully_shard`` over the data-parallel dims (HSDP when ``dp_replicate`` > 1); only the local
shards are materialized with ``to_empty``. The checkpointer then fills them from the files.

:func:`parallel_mesh` names its dims as torchtitan does: ``("dp_replicate", "dp_shard", "tp")``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.peft import LoRALinear
from torchtune.training import set_activation_checkpointing

from checkpointer.errors import CheckpointArgumentError
from checkpointer.format.model_config import ModelConfig
from checkpointer.runtime.distributed import world_size
from checkpointer.train import tp_plans
from checkpointer.train.builders import LoraSpec, build_model, reset_rope_buffers

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


def default_mesh(device: str = "cpu") -> DeviceMesh:
    """A 1-D mesh over every rank of the default process group."""
    return init_device_mesh(device, (world_size(),))


def parallel_mesh(device: str = "cpu", *, tensor_parallel_dim: int = 1, data_parallel_replicate_dim: int = 1) -> DeviceMesh:
    """A ``(dp_replicate, dp_shard, tp)`` mesh over every rank; ``dp_shard`` takes the ranks left over."""
    world, per_shard = world_size(), tensor_parallel_dim * data_parallel_replicate_dim
    if tensor_parallel_dim < 1 or data_parallel_replicate_dim < 1 or world % per_shard:
        raise CheckpointArgumentError(
            f"tensor_parallel_dim {tensor_parallel_dim} x data_parallel_replicate_dim {data_parallel_replicate_dim} "
            f"must divide the {world} ranks",
            key="tensor_parallel_dim",
        )
    return init_device_mesh(device, (data_parallel_replicate_dim, world // per_shard, tensor_parallel_dim), mesh_dim_names=MESH_DIMS)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The dims FSDP2 shards over: all of a 1-D mesh, else ``dp_shard`` (with ``dp_replicate``: HSDP); None for one rank."""
    if mesh.mesh_dim_names is None or "tp" not in mesh.mesh_dim_names:
        return mesh
    dp = mesh[MESH_DIMS[:2]] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    return dp if dp.size() > 1 else None


def data_parallel_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's place among the data-parallel ranks and their number (the ranks of one ``tp`` group share data)."""
    tp = mesh["tp"].size() if mesh.mesh_dim_names and "tp" in mesh.mesh_dim_names else 1
    return mesh.get_rank() // tp, mesh.size() // tp


def tensor_parallelize(model: nn.Module, mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> nn.Module:
    """torchtune's recipe steps: local head counts per ``tp`` rank, then ``parallelize_module`` with ``plan``."""
    model = training.prepare_mha_for_tp(model, mesh)
    parallelize_module(model, mesh, parallelize_plan=plan)
    return model


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    plan: dict[str, ParallelStyle] | None,
    model_type: str | None = None,
    *,
    activation_checkpointing: bool = False,
    custom_sharded_layers: Sequence[str] = (),
) -> nn.Module:
    """Tensor-parallelize over ``mesh["tp"]`` (when it has more than one rank), then ``fully_shard`` over the rest.

    ``plan`` defaults to the one for ``model_type`` (``train.tp_plans``). Activation checkpointing
    wraps the layers between the two, as torchtune's recipes do (the plan names unwrapped modules).
    """
    if mesh.mesh_dim_names and "tp" in mesh.mesh_dim_names and mesh["tp"].size() > 1:
        model = tensor_parallelize(model, mesh["tp"], plan if plan is not None else tp_plans.tp_plan(str(model_type)))
    if activation_checkpointing:
        checkpoint_activations(model)
    dp = data_parallel_mesh(mesh)
    return shard_model(model, dp, custom_sharded_layers=custom_sharded_layers) if dp is not None else model


def shard_model(
    model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None, custom_sharded_layers: Sequence[str] = ()
) -> nn.Module:
    """``fully_shard`` each transformer layer, then the modules named in ``custom_sharded_layers``
    (torchtune's key, e.g. ``["tok_embeddings", "output"]``), then the root (what is left).

    With tied embeddings the output projection uses the embedding's weight outside the
    embedding's forward, so neither can be sharded on its own: refused by name.
    """
    kwargs = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy else {})}
    tied = not isinstance(getattr(model, "output", None), nn.Module)
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    for name in custom_sharded_layers:
        module = getattr(model, name, None)
        if not isinstance(module, nn.Module) or (tied and name in ("tok_embeddings", "output")):
            why = "the output is tied to the embeddings" if tied and module is not None else "the model has no such module"
            raise CheckpointArgumentError(f"custom_sharded_layers: {name!r} cannot be sharded on its own: {why}", key="custom_sharded_layers")
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """torchtune's ``enable_activation_checkpointing``: recompute each layer's activations in the backward pass."""
    set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
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
    tp_plan: dict[str, ParallelStyle] | None = None,
    activation_checkpointing: bool = False,
    custom_sharded_layers: Sequence[str] = (),
) -> nn.Module:
    """A model of ``model_type`` sharded over ``mesh``, with uninitialized local shards.

    ``mesh``: a 1-D mesh (FSDP2), or one from :func:`parallel_mesh` (tensor parallel over its
    ``tp`` dim with ``tp_plan``, default the family's, then FSDP2 or HSDP over the others).
    Load weights into it with ``DistributedHFCheckpointer.load_model``.
    """
    mesh = mesh or default_mesh(torch.device(device).type)
    with torch.device("meta"):
        model = build_model(model_type, config, lora=lora, max_seq_len=max_seq_len).to(dtype)
    model = parallelize(
        model, mesh, tp_plan, model_type, activation_checkpointing=activation_checkpointing, custom_sharded_layers=custom_sharded_layers
    )
    model.to_empty(device=device)
    reset_rope_buffers(model, device)
    initialize_lora(model)
    return model


def initialize_lora(model: nn.Module) -> None:
    """LoRA's own initialization (A random, B zero), lost by ``to_empty``; the checkpointer overwrites it on resume."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.initialize_parameters()
