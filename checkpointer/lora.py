"""LoRA: merged weights computed shard by shard, and PEFT's adapter_config.json."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchtune.modules.peft import LoRALinear

from checkpointer.layouts import is_adapter_key

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_DIR = "adapter"  # where the adapter goes when merged weights are published beside it
ADAPTER_CONFIG_FILE = "adapter_config.json"


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
    a = _full(module.lora_a.weight).float()
    b = _local(module.lora_b.weight).float()
    merged = (_local(weight).float() + (module.alpha / module.rank) * (b @ a)).to(weight.dtype)
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


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA parameters (sharded like the model)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def peft_adapter_config(
    hf_keys: list[str], rank: int, alpha: float, base_model: str | None, dropout: float = 0.0
) -> dict[str, Any]:
    """PEFT's adapter_config.json for adapter tensors named ``hf_keys`` (``...q_proj.lora_A.weight``)."""
    modules = sorted({key.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for key in hf_keys})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
    }
