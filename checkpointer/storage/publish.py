"""Making a written checkpoint folder visible, complete, in one step.

The weights are written into a hidden staging folder beside the destination; the support
files (config, tokenizer), the index and, last, the manifest are added; everything is
fsynced, and the staging folder is renamed into place. A reader never sees a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from checkpointer.errors import CheckpointError
from checkpointer.format.digests import Digests
from checkpointer.format.manifest import MANIFEST_FILE, write_manifest


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


def seal(folder: Path, info: dict[str, Any], sizes: dict[str, int], hashes: Digests) -> None:
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
            f"(the new checkpoint is complete in {staging}; move one of them)",
            file=str(final),
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

