"""``checkpointer consolidate``: re-split (and optionally convert) a checkpoint's weights into a new place."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from checkpointer.cli.common import Checkpoint, Outcome, Timer, publish_built
from checkpointer.cli.rewrite import rewrite, rewrite_layout
from checkpointer.format.hf_files import CONFIG_FILE, INDEX_FILE, SUPPORT_FILES, CheckpointFiles
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.storage.factory import make_location
from checkpointer.storage.hub_location import README

log = logging.getLogger(__name__)


def consolidate(
    source: str,
    to: str,
    max_shard_size: int | str,
    dtype: torch.dtype | None,
    *,
    private: bool = True,
    message: str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Outcome:
    """Write ``source``'s weights to ``to`` in files of at most ``max_shard_size`` (one file when it all fits)."""
    timer = Timer()
    checkpoint = Checkpoint.open(source, "LOCATION", storage_options)
    destination = make_location(to, "--to", storage_options, private=private)
    files = checkpoint.weights()
    file_layout = rewrite_layout(files, dtype, max_shard_size)
    _mention_what_stays(checkpoint, files)

    def build(out: Path) -> None:
        rewrite(checkpoint, files, file_layout, out, f"consolidate -> {to}")
        if README in checkpoint.files:  # the model's card describes the same model
            (out / README).write_bytes(checkpoint.read_bytes(README))

    message = message or f"checkpointer consolidate: {len(file_layout.headers)} file(s) from {source}"
    where = publish_built(destination, build, command="consolidate", message=message, overwrite=overwrite)
    return Outcome(0, f"consolidated {len(files.tensors)} tensors into {len(file_layout.headers)} file(s), {timer.rate(file_layout.total_bytes)} -> {where}")


def _mention_what_stays(checkpoint: Checkpoint, files: CheckpointFiles) -> None:
    copied = {CONFIG_FILE, README, INDEX_FILE, MANIFEST_FILE, *SUPPORT_FILES, *files.files}  # a new manifest is written
    left = sorted({name.split("/", 1)[0] for name in checkpoint.files} - copied)
    if left:
        log.info("not copied (consolidate writes the weights, config and tokenizer files): %s", ", ".join(left))
