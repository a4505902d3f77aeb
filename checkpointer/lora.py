"""LoRA: merged weights computed shard by shard, and PEFT's adapter_config.json."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torchtune.modules.peft import LoRALinear

from checkpointer.errors import CheckpointError
from checkpointer.layouts import PEFT_PREFIX, is_adapter_key

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_DIR = "adapter"  # where the adapter goes when merged weights are published beside it
ADAPTER_CONFIG_FILE = "adapter_config.json"


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` computed in fp32, in W's dtype (W: out x in, A: r x in, B: out x r)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


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


def lora_scale(config: dict[str, Any], where: str) -> float:
    """The factor PEFT applies to ``B A``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    Refuses what a plain merge cannot reproduce (DoRA, per-module rank or alpha patterns).
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA adapters can be merged")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise CheckpointError(f"{where}: {', '.join(unsupported)} cannot be merged here; merge with peft's merge_and_unload()")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}: needs integer 'r' and number 'lora_alpha'") from None
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def peft_pairs(adapter_keys: Iterable[str], where: str) -> dict[str, tuple[str, str]]:
    """Base weight key -> its (``lora_A``, ``lora_B``) keys, for the keys of a PEFT adapter file."""
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter_keys:
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not module or kind not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{where}: {key!r} is not a LoRA weight (expected ...lora_A.weight / ...lora_B.weight)")
        pairs.setdefault(f"{module}.weight", {})[kind[0]] = key
    unpaired = sorted(k for k, pair in pairs.items() if len(pair) != 2)
    if unpaired:
        raise CheckpointError(f"{where}: {unpaired[0]} has only one of lora_A and lora_B")
    return {base: (pair["A"], pair["B"]) for base, pair in pairs.items()}
