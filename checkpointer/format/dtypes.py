"""One table of dtypes and the names each goes by in a safetensors header, in config.json, and in short.

Short names (``fp32``, ``bf16``, ``fp16``) are torchtune's ``dtype:`` values and what
``save_dtype`` and the command line's ``--dtype`` take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from checkpointer.errors import CheckpointArgumentError


@dataclass(frozen=True)
class DTypeNames:
    """The names of one dtype."""

    dtype: torch.dtype
    safetensors: str  # in a safetensors header: "BF16"
    config: str | None = None  # in config.json ("dtype" or "torch_dtype"): "bfloat16"
    short: str | None = None  # torchtune's and ours: "bf16"


TABLE: tuple[DTypeNames, ...] = (
    DTypeNames(torch.float64, "F64", "float64"),
    DTypeNames(torch.float32, "F32", "float32", "fp32"),
    DTypeNames(torch.float16, "F16", "float16", "fp16"),
    DTypeNames(torch.bfloat16, "BF16", "bfloat16", "bf16"),
    DTypeNames(torch.int64, "I64"),
    DTypeNames(torch.int32, "I32"),
    DTypeNames(torch.int16, "I16"),
    DTypeNames(torch.int8, "I8"),
    DTypeNames(torch.uint8, "U8"),
    DTypeNames(torch.uint16, "U16"),
    DTypeNames(torch.uint32, "U32"),
    DTypeNames(torch.uint64, "U64"),
    DTypeNames(torch.bool, "BOOL"),
    DTypeNames(torch.float8_e4m3fn, "F8_E4M3"),
    DTypeNames(torch.float8_e5m2, "F8_E5M2"),
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {n.safetensors: n.dtype for n in TABLE}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {n.dtype: n.safetensors for n in TABLE}
CONFIG_DTYPES: dict[str, torch.dtype] = {n.config: n.dtype for n in TABLE if n.config}
CONFIG_NAMES: dict[torch.dtype, str] = {n.dtype: n.config for n in TABLE if n.config}
SHORT_DTYPES: dict[str, torch.dtype] = {n.short: n.dtype for n in TABLE if n.short}


def parse_dtype(value: str | torch.dtype | None, argument: str) -> torch.dtype | None:
    """``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None.

    Anything else is a CheckpointArgumentError naming ``argument``.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = SHORT_DTYPES.get(name) or CONFIG_DTYPES.get(name)
    if dtype is None:
        raise CheckpointArgumentError(f"{argument} {value!r} is not a dtype (use {', '.join(SHORT_DTYPES)})", key=argument)
    return dtype
