"""LoRA in a live model: merged weights computed shard by shard (only the small A is gathered)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchtune.modules.peft import LoRALinear

from checkpointer.format.peft import merge_lora
from checkpointer.mapping.key_maps import is_adapter_key


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _merged_weight(module: LoRALinear) -> torch.Tensor:
    """``W + (alpha / r) B A`` for this rank's rows of W; only the small A is gathered.

    FSDP2 shards W (out x in) and B (out x r) along the same ``out`` rows, so the local
    rows of B line up with the local rows of W.
    """
    weight = module.weight
    merged = merge_lora(_local(weight), _full(module.lora_a.weight), _local(module.lora_b.weight), module.alpha / module.rank)
    if isinstance(weight, DTensor):
        return DTensor.from_local(merged, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride())
    return merged


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA linear merged into its base weight (no adapter keys).

    Collective under FSDP2 (each LoRA ``A`` is all-gathered; it is rank x in).
    """
    merged = {f"{name}.weight": _merged_weight(m) for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {k: merged.get(k, v) for k, v in model.state_dict().items() if not is_adapter_key(k)}

