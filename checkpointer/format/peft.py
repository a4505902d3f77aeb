"""PEFT's adapter format: file names, ``adapter_config.json``, and the ``W + s B A`` merge."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from checkpointer.errors import CheckpointFormatError, CheckpointUnsupportedError

PEFT_PREFIX = "base_model.model."  # PEFT's name prefix for the wrapped model
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_DIR = "adapter"  # where the adapter goes when merged weights are published beside it
ADAPTER_CONFIG_FILE = "adapter_config.json"


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` computed in fp32, in W's dtype (W: out x in, A: r x in, B: out x r)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


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
        raise CheckpointUnsupportedError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA adapters can be merged", file=where)
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise CheckpointUnsupportedError(f"{where}: {', '.join(unsupported)} cannot be merged here; merge with peft's merge_and_unload()", file=where)
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointFormatError(f"{where}: needs integer 'r' and number 'lora_alpha'", file=where) from None
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def peft_pairs(adapter_keys: Iterable[str], where: str) -> dict[str, tuple[str, str]]:
    """Base weight key -> its (``lora_A``, ``lora_B``) keys, for the keys of a PEFT adapter file."""
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter_keys:
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not module or kind not in ("A.weight", "B.weight"):
            raise CheckpointFormatError(f"{where}: {key!r} is not a LoRA weight (expected ...lora_A.weight / ...lora_B.weight)", file=where, key=key)
        pairs.setdefault(f"{module}.weight", {})[kind[0]] = key
    unpaired = sorted(k for k, pair in pairs.items() if len(pair) != 2)
    if unpaired:
        raise CheckpointFormatError(f"{where}: {unpaired[0]} has only one of lora_A and lora_B", file=where, key=unpaired[0])
    return {base: (pair["A"], pair["B"]) for base, pair in pairs.items()}

