"""torchtune 0.6.1's recipe config keys in our recipes: each one is honoured, or refused by name.

torchtune's own configs (``llama3_2/1B_full.yaml``...) run in ``recipes/*_finetune_distributed.py``
with only the checkpointer block changed. Keys the loop honours are read where they act
(``checkpointer.train.finetune``); the keys below are refused when set, with an error that
names them, because silently ignoring them changes the run (an ignored
``enable_activation_offloading`` is an out-of-memory on a large model).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from checkpointer.errors import CheckpointArgumentError

# dotted key -> what to use instead; refused when its value is set (not null/false)
REFUSED: dict[str, str] = {
    "compile": "torch.compile is not applied by these recipes; remove compile or use torchtune's recipe",
    "enable_activation_offloading": "activation offloading needs CUDA streams these recipes do not set up; "
    "use enable_activation_checkpointing",
    "fsdp_cpu_offload": "FSDP2 CPU offload is not set up by these recipes",
    "optimizer_in_bwd": "the optimizer steps after the backward pass here (gradients are normalized by the global token count first)",
    "enable_async_checkpointing": "use checkpointer.async_save: true (the same checkpoints, written in the background)",
    "dataset.packed": "packed datasets need torchtune's packed collate; set packed: false",
    "profiler.enabled": "the torch profiler is not run by these recipes",
    "ac_mode": "selective activation checkpointing is not applied; use enable_activation_checkpointing",
    "ac_option": "selective activation checkpointing is not applied; use enable_activation_checkpointing",
}
# torchtune's values that mean "off" even though they are set
_OFF = (None, False, "", 0)


def _value(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted, default=None)


def refuse_unsupported(cfg: DictConfig) -> None:
    """Raise naming every torchtune key this config sets that the recipes cannot honour."""
    refused = [f"{key}={_value(cfg, key)!r}: {why}" for key, why in REFUSED.items() if _value(cfg, key) not in _OFF]
    if cfg.get("shuffle") is False:
        refused.append("shuffle=False: every epoch is a seeded permutation of the dataset here")
    if refused:
        raise CheckpointArgumentError("config keys these recipes cannot honour:\n  " + "\n  ".join(refused), key=refused[0].split("=")[0])


def global_batch_size(cfg: DictConfig, world: int) -> int:
    """Examples per optimizer step: ``global_batch_size``, else torchtune's
    ``batch_size * gradient_accumulation_steps * world size``; both must agree when both are set."""
    accumulation = cfg.get("gradient_accumulation_steps")
    implied = int(cfg.batch_size) * int(accumulation) * world if accumulation else None
    if cfg.get("global_batch_size") is None:
        return implied or int(cfg.batch_size) * world
    if implied is not None and implied != int(cfg.global_batch_size):
        raise CheckpointArgumentError(
            f"global_batch_size={cfg.global_batch_size} but batch_size={cfg.batch_size} x gradient_accumulation_steps="
            f"{accumulation} x {world} ranks = {implied}: set one of them",
            key="global_batch_size",
        )
    return int(cfg.global_batch_size)


def lora_alpha(cfg: DictConfig) -> float:
    """``model.lora.lora_alpha`` (our configs) or ``model.lora_alpha`` (torchtune's LoRA builders)."""
    value = _value(cfg, "model.lora.lora_alpha")
    value = _value(cfg, "model.lora_alpha") if value is None else value
    if value is None:
        raise CheckpointArgumentError("LoRA needs model.lora.lora_alpha (or model.lora_alpha for a torchtune builder)", key="model.lora.lora_alpha")
    return float(value)
