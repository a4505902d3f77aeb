"""``checkpointer.json``: written last into every checkpoint; its presence means the checkpoint is whole.

It records what the checkpoint holds (weights, adapter, training state), when and how it
was made, and every other file with its size and its digests: xxh3_128 ranges tiling the
file (:mod:`checkpointer.format.digests`), hashed from memory by the ranks that wrote the
weights and read back only for the small files other code wrote (and training state).
Manifests written before record one sha256 per file instead; both verify.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.digests import ALGORITHM, LEGACY_ALGORITHM, Digests, Range
from checkpointer.format.folder import Folder, local_files
from checkpointer.format.json_files import parse_json, write_json

MANIFEST_FILE = "checkpointer.json"
TRAINING_STATE_DIR = "training_state"  # a checkpoint's resumable training state (DCP's format)


FORMAT_VERSION = 1


@dataclass(frozen=True)
class Contents:
    """What a checkpoint holds (the manifest's ``contents``): full weights, a LoRA adapter, resumable training state.

    ``adapter`` is the adapter's subfolder (``""``: the checkpoint's top level), None without one.
    """

    weights: bool = False
    adapter: str | None = None
    training_state: bool = False

    @classmethod
    def of(cls, manifest: dict[str, Any], where: str = MANIFEST_FILE) -> Contents:
        """The contents the manifest at ``where`` records (one without them holds nothing known)."""
        raw = manifest.get("contents") or {}
        adapter = raw.get("adapter") if isinstance(raw, dict) else None
        if not isinstance(raw, dict) or not (adapter is None or isinstance(adapter, str)):
            raise CheckpointFormatError(f"{where}: 'contents' must be an object with weights, adapter and training_state, not {raw!r}", file=where)
        return cls(bool(raw.get("weights")), adapter, bool(raw.get("training_state")))

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def files_of(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative POSIX path -> size), the manifest excluded."""
    return {name: size for name, size in local_files(folder).items() if name.rsplit("/", 1)[-1] != MANIFEST_FILE}


def write_manifest(folder: Path, info: dict[str, Any], sizes: dict[str, int], digests: Digests) -> dict[str, Any]:
    """Write the manifest of ``folder``, whose files are ``sizes`` with ``digests`` (``info`` adds name, epoch, step...)."""
    now = time.time_ns()
    files = {name: {"size": size, ALGORITHM: [r.as_json() for r in digests.get(name, [])]} for name, size in sizes.items()}
    manifest = {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
        "created_ns": now,  # orders checkpoints: epoch_N and step_N names do not
        **info,
        "files": files,
    }
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def parse_manifest(text: bytes, where: str) -> dict[str, Any]:
    manifest = parse_json(text, where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise CheckpointFormatError(f"{where}: not a checkpointer manifest of format {FORMAT_VERSION}", file=where)
    return manifest


def read_manifest(folder: Folder) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none."""
    if not folder.exists(MANIFEST_FILE):
        return None
    return parse_manifest(folder.read(MANIFEST_FILE, 0, folder.size(MANIFEST_FILE)), folder.describe(MANIFEST_FILE))


def check_against_manifest(folder: Folder, manifest: dict[str, Any], names: list[str]) -> None:
    """Sizes of ``names`` must be what the manifest recorded (a cheap guard against truncation)."""
    for name in names:
        expected = (manifest["files"].get(name) or {}).get("size")
        if expected is not None and folder.size(name) != expected:
            raise CheckpointFormatError(
                f"{folder.describe(name)}: {folder.size(name)} bytes, but {MANIFEST_FILE} recorded {expected}: "
                "the file was truncated or replaced",
                file=folder.describe(name),
            )


@dataclass(frozen=True)
class FileRecord:
    """What a manifest says of one file: its size and, when recorded, its xxh3 ranges or (older manifests) its sha256."""

    size: int | None
    sha256: str | None = None
    ranges: tuple[Range, ...] | None = None

    @property
    def has_digests(self) -> bool:
        return bool(self.sha256) or self.ranges is not None


def recorded_files(manifest: dict[str, Any]) -> dict[str, FileRecord]:
    """The files a manifest lists (relative path -> record), one process.

    ``files`` maps each path to ``{"size": ..., "xxh3_128": [range, ...]}``, each range
    ``[offset, length, digest]`` or ``[offset, length, stride, count, digest]``;
    older manifests record ``"sha256"`` instead, and the oldest the size alone.
    """
    records = {}
    for path, value in (manifest.get("files") or {}).items():
        info = value if isinstance(value, dict) else {"size": value}
        size, ranges = info.get("size"), info.get(ALGORITHM)
        ranges = tuple(tuple(r) for r in ranges) if isinstance(ranges, list) and all(isinstance(r, list) for r in ranges) else None
        records[path] = FileRecord(size if isinstance(size, int) else None, info.get(LEGACY_ALGORITHM), ranges)
    return records

