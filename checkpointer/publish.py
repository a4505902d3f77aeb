"""Making a written checkpoint folder visible, complete, in one step.

The weights are written into a hidden staging folder beside the destination. Then the
support files (config, tokenizer) and, last, the index are added, everything is
fsynced, and the staging folder is renamed into place. A reader never sees a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from checkpointer.errors import CheckpointError
from checkpointer.file_layout import FileLayout
from checkpointer.folders import Folder
from checkpointer.hf_files import INDEX_FILE, SUPPORT_FILES
from checkpointer.manifest import MANIFEST_FILE, write_manifest

if TYPE_CHECKING:
    from checkpointer.layouts import Layout
    from checkpointer.matching import Destination
    from checkpointer.safetensors_format import TensorSpec

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def output_config(base: dict[str, Any], dtype: torch.dtype | None, tied: bool | None) -> dict[str, Any]:
    """The base config, updated to describe the saved weights (dtype, tied embeddings; None leaves either as is)."""
    config = dict(base)
    if dtype in _TORCH_DTYPE_NAMES:
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        config[key] = _TORCH_DTYPE_NAMES[dtype]
    if tied is not None:
        config["tie_word_embeddings"] = tied
    return config


def saved_config(base: dict[str, Any], layout: Layout, specs: dict[str, TensorSpec], destinations: dict[str, Destination]) -> dict[str, Any]:
    """The config of weights saved as ``specs`` (dtype when there is one, tied unless lm_head is written)."""
    tied = not any(d.hf_key in layout.tied for d in destinations.values())
    dtypes = {s.dtype for s in specs.values()}
    return output_config(base, dtypes.pop() if len(dtypes) == 1 else None, tied)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def copy_support_files(base: Folder, folder: Path) -> None:
    """Copy the tokenizer and generation files of the base checkpoint."""
    for name in SUPPORT_FILES:
        if base.exists(name):
            (folder / name).write_bytes(base.read(name, 0, base.size(name)))


def write_index(folder: Path, layout: FileLayout, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors.index.json`` (when the layout needs one)."""
    if layout.needs_index:
        metadata = {"total_size": layout.total_bytes, **(extra_metadata or {})}
        write_json(folder / INDEX_FILE, {"metadata": metadata, "weight_map": layout.weight_map})


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and itself) to stable storage."""
    for path in folder.rglob("*"):
        _fsync(path)
    _fsync(folder)


def make_readable_not_writable(folder: Path) -> None:
    """Files 0644 and folders 0755 whatever the umask: nobody else can modify a checkpoint."""
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    folder.chmod(0o755)


def seal(folder: Path, info: dict[str, Any], sizes: dict[str, int], hashes: dict[str, str]) -> None:
    """Finish a written folder: its manifest last, then read-only and flushed to stable storage."""
    write_manifest(folder, info, sizes, hashes)
    make_readable_not_writable(folder)
    fsync_tree(folder)


def replace_folder(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an older checkpoint ``final`` is moved aside first, then removed.

    Something at ``final`` that checkpointer did not write (no manifest, or a symlink) is never
    replaced: the new checkpoint stays in ``staging`` and the error says so.
    """
    if final.is_symlink() or (final.exists() and not (final / MANIFEST_FILE).is_file()):
        raise CheckpointError(
            f"{final}: exists and was not written by checkpointer; refusing to replace it "
            f"(the new checkpoint is complete in {staging}; move one of them)"
        )
    old = final.parent / f".{final.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)
