"""Writing Hugging Face weights anew, one tensor at a time (consolidate, export of an adapter).

Each tensor is read from its byte range, optionally transformed (an adapter merged),
converted to its saved dtype and ``pwrite``-n at its offset in a layout computed up front by
``layout_files``; memory holds one tensor at a time. The index is written last.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from checkpointer.cli.common import Checkpoint
from checkpointer.format.file_layout import FileLayout, layout_files
from checkpointer.format.hf_files import CONFIG_FILE, CheckpointFiles
from checkpointer.format.hf_output import copy_support_files, output_config, write_index
from checkpointer.format.json_files import write_json
from checkpointer.format.safetensors import TensorSpec
from checkpointer.format.tensor_io import create_files, read_tensor, write_tensor
from checkpointer.mapping.local_shards import converted
from checkpointer.runtime.progress import byte_bar

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def rewrite_layout(files: CheckpointFiles, dtype: torch.dtype | None, max_shard_size: int | str) -> FileLayout:
    """The new files: every tensor of ``files`` (floating-point ones in ``dtype``), split by ``max_shard_size``."""
    specs = {k: TensorSpec(k, converted(dtype, e.dtype), e.shape) for k, e in files.tensors.items()}
    return layout_files(specs, None, max_shard_size)


def copy_tensors(files: CheckpointFiles, layout: FileLayout, out: Path, label: str, transform: Transform | None = None) -> int:
    """Write every tensor of ``files`` into the files of ``layout`` in ``out``; returns the bytes written."""
    create_files(out, layout)
    fds: dict[str, int] = {}
    written = 0
    try:
        with byte_bar(layout.total_bytes, label) as bar:
            for entry in sorted(files.tensors.values(), key=lambda e: (e.file, e.start)):
                tensor = read_tensor(files.folder, entry)
                if transform is not None:
                    tensor = transform(entry.name, tensor)
                target = layout.entries[entry.name]
                if target.file not in fds:
                    fds[target.file] = os.open(out / target.file, os.O_WRONLY)
                written += write_tensor(fds[target.file], target, tensor)
                bar.update(target.nbytes)
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


def write_support(source: Checkpoint, out: Path, layout: FileLayout) -> None:
    """Config (its dtype updated to the weights'), tokenizer and generation files, then the index last."""
    copy_support_files(source.folder, out)
    config = source.config()
    if config is not None:
        dtypes = {e.dtype for e in layout.entries.values()}
        write_json(out / CONFIG_FILE, output_config(config, dtypes.pop() if len(dtypes) == 1 else None, None))
    write_index(out, layout)


def rewrite(source: Checkpoint, files: CheckpointFiles, layout: FileLayout, out: Path, label: str, transform: Transform | None = None) -> int:
    """The whole new folder: weights, then support files, then the index."""
    written = copy_tensors(files, layout, out, label, transform)
    write_support(source, out, layout)
    return written
