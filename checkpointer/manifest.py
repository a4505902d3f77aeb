"""``checkpointer.json``: written last into every checkpoint; its presence means the checkpoint is whole.

It records what the checkpoint holds (weights, adapter, training state), when and how it
was made, and every other file with its size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from checkpointer.errors import CheckpointFormatError

MANIFEST_FILE = "checkpointer.json"
FORMAT_VERSION = 1


def files_of(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative POSIX path -> size), the manifest excluded."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def write_manifest(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest of ``folder`` (``info`` adds name, epoch, step, contents...)."""
    now = time.time_ns()
    manifest = {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
        "created_ns": now,  # orders checkpoints: epoch_N and step_N names do not
        **info,
        "files": files_of(folder),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def parse_manifest(text: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointFormatError(f"{where}: not a checkpointer manifest of format {FORMAT_VERSION}")
    return manifest
