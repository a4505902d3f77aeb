"""What a saved Hugging Face folder holds besides the weights: config.json, the index, support files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from checkpointer.format.dtypes import CONFIG_NAMES
from checkpointer.format.file_layout import FileLayout
from checkpointer.format.folder import Folder
from checkpointer.format.hf_files import INDEX_FILE, SUPPORT_FILES
from checkpointer.format.json_files import write_json


def output_config(base: dict[str, Any], dtype: torch.dtype | None, tied: bool | None) -> dict[str, Any]:
    """The base config, updated to describe the saved weights (dtype, tied embeddings; None leaves either as is)."""
    config = dict(base)
    if dtype in CONFIG_NAMES:
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        config[key] = CONFIG_NAMES[dtype]
    if tied is not None:
        config["tie_word_embeddings"] = tied
    return config


def copy_support_files(base: Folder, folder: Path) -> None:
    """Copy the tokenizer and generation files of the base checkpoint."""
    for name in SUPPORT_FILES:
        if base.exists(name):
            (folder / name).write_bytes(base.read(name, 0, base.size(name)))


def write_index(folder: Path, file_layout: FileLayout, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors.index.json`` (when the layout needs one)."""
    if file_layout.needs_index:
        metadata = {"total_size": file_layout.total_bytes, **(extra_metadata or {})}
        write_json(folder / INDEX_FILE, {"metadata": metadata, "weight_map": file_layout.weight_map})
