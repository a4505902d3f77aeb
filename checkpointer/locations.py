"""Where checkpoints are read from and published to: local folders, fsspec URLs, the Hub.

Every location answers the same questions:
- ``open(...)``: a :class:`Folder` to read the checkpoint here (remote ones download the
  needed files once per node, or with ``streaming`` read byte ranges on demand);
- ``staging_dir(name)``: the local folder where checkpoint ``name`` is assembled;
- ``publish(folder, name, card)``: make it visible, complete, in one step;
- ``staging_folder()`` / ``replace_with(folder, ...)``: the same for the location itself
  (what the command line's ``consolidate``, ``export`` and ``push`` write);
- ``list_files()`` (one process): every file here, with its size;
- ``checkpoint(name)``: where checkpoint ``name`` can be read back;
- ``checkpoint_names()`` / ``remove(name)``: the complete checkpoints (by name; their manifests
  tell their order), for resuming and pruning;
- ``read_file(path)`` (one process) and ``fetch_folder(path)`` (collective): files of a checkpoint.

Publishing puts ``LAST_FILES`` last, so that on stores without atomic rename a reader
sees a checkpoint as complete (``checkpointer.json`` present) only when it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import torch.distributed as dist

from checkpointer.errors import CheckpointError
from checkpointer.folders import Folder, LocalFolder, local_files, make_dirs
from checkpointer.hf_files import CONFIG_FILE, INDEX_FILE
from checkpointer.location_urls import FsspecUrl, HubUrl, LocalPath, parse_location
from checkpointer.manifest import MANIFEST_FILE
from checkpointer.publish import replace_folder

T = TypeVar("T")
CHECKPOINT_NAME = re.compile(r"^(epoch|step)_(\d+)$")
LAST_FILES = (INDEX_FILE, CONFIG_FILE, MANIFEST_FILE)


def kept_on_failure(what: str, folder: Path, upload: Callable[[], T], explain: Callable[[Exception], str] = str) -> T:
    """Run ``upload``; if it fails, raise an error that names the staged copy ``folder`` (which is kept)."""
    try:
        return upload()
    except Exception as e:
        raise CheckpointError(f"{what} failed ({explain(e)}); the complete checkpoint is kept at {folder}") from e


def upload_order(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> size), with ``LAST_FILES`` (top level) at the end."""
    files = local_files(folder)
    return {f: size for f, size in files.items() if f not in LAST_FILES} | {f: files[f] for f in LAST_FILES if f in files}


def cache_root() -> Path:
    """Where remote checkpoints are downloaded to and remote saves are staged."""
    return Path(os.environ.get("CHECKPOINTER_CACHE", Path.home() / ".cache" / "checkpointer"))


def url_key(url: str) -> str:
    """A short, stable folder name for a URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path`` (a leftover of an interrupted run is removed)."""
    if path.exists():
        shutil.rmtree(path)
    make_dirs(path)
    return path


def remote_staging_dir(url: str, name: str) -> Path:
    """The local folder where checkpoint ``name`` of the remote location ``url`` is assembled."""
    return cache_root() / "staging" / url_key(url) / name


def remote_staging_folder(url: str) -> Path:
    """A fresh local folder where the remote location ``url`` itself is assembled."""
    return fresh_dir(cache_root() / "staging" / f"{url_key(url)}-here")


class Location(Protocol):
    """A place checkpoints live."""

    def describe(self, name: str = "") -> str: ...

    def open(self, group: dist.ProcessGroup | None = None, streaming: bool = False, checkpoint_files=None) -> Folder: ...

    def staging_dir(self, name: str) -> Path: ...

    def publish(self, folder: Path, name: str, card: dict[str, Any]) -> str: ...

    def staging_folder(self) -> Path: ...

    def replace_with(
        self, folder: Path, card: dict[str, Any] | None = None, message: str | None = None, tag: str | None = None
    ) -> str: ...

    def list_files(self) -> dict[str, int]: ...

    def checkpoint(self, name: str) -> Location: ...

    def subfolder(self, path: str) -> Location: ...

    def checkpoint_names(self) -> list[str]: ...

    def remove(self, name: str) -> None: ...

    def read_file(self, path: str) -> bytes | None: ...

    def fetch_folder(self, path: str, group: dist.ProcessGroup | None = None) -> Path: ...


class LocalLocation:
    """A folder on a local or shared file system; publishing is an atomic rename."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def describe(self, name: str = "") -> str:
        return str(self.path / name) if name else str(self.path)

    def open(self, group=None, streaming: bool = False, checkpoint_files=None) -> Folder:
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such folder")
        return LocalFolder(self.path)

    def staging_dir(self, name: str) -> Path:
        return self.path / f".{name}.partial"

    def publish(self, folder: Path, name: str, card: dict[str, Any]) -> str:
        return self.checkpoint(name).replace_with(folder)

    def staging_folder(self) -> Path:
        """A fresh hidden folder beside this one (same file system, so publishing is a rename)."""
        return fresh_dir(self.path.parent / f".{self.path.name}.partial")

    def replace_with(self, folder: Path, card: dict[str, Any] | None = None, message: str | None = None, tag: str | None = None) -> str:
        """Rename ``folder`` (from :meth:`staging_folder`) into place; an older folder here is replaced whole."""
        replace_folder(folder, self.path)
        return str(self.path)

    def list_files(self) -> dict[str, int]:
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such folder")
        return local_files(self.path)

    def checkpoint(self, name: str) -> LocalLocation:
        return LocalLocation(self.path / name)

    def subfolder(self, path: str) -> LocalLocation:
        return LocalLocation(self.path / path) if path else self

    def checkpoint_names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        names = [
            p.name
            for p in self.path.iterdir()
            if CHECKPOINT_NAME.match(p.name) and not p.is_symlink() and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(names)

    def read_file(self, path: str) -> bytes | None:
        target = self.path / path
        return target.read_bytes() if target.is_file() else None

    def fetch_folder(self, path: str, group=None) -> Path:
        return self.path / path

    def remove(self, name: str) -> None:
        target = self.path / name
        if not CHECKPOINT_NAME.match(name) or target.is_symlink() or target.resolve().parent != self.path.resolve():
            raise CheckpointError(f"{target}: refusing to remove something that is not a checkpoint folder of {self.path}")
        shutil.rmtree(target)


def make_location(
    value: str | Path, argument: str, storage_options: dict[str, Any] | None = None, private: bool = True
) -> Location:
    """The location for a ``checkpoint_dir``/``output_dir`` value (checked before any collective)."""
    parsed = parse_location(value, argument)
    if isinstance(parsed, LocalPath):
        return LocalLocation(parsed.path)
    if isinstance(parsed, FsspecUrl) and parsed.protocol == "file":
        return LocalLocation(Path(parsed.url.split("://", 1)[1]))
    if isinstance(parsed, FsspecUrl):
        from checkpointer.fsspec_location import FsspecLocation

        return FsspecLocation(parsed.url, storage_options or {})
    from checkpointer.hub_location import HubLocation

    assert isinstance(parsed, HubUrl)
    return HubLocation(parsed, private=private)
