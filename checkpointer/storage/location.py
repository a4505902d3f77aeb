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

from checkpointer.errors import CheckpointTransportError
from checkpointer.format.folder import Folder, local_files, make_dirs
from checkpointer.format.hf_files import CONFIG_FILE, INDEX_FILE
from checkpointer.format.manifest import MANIFEST_FILE

T = TypeVar("T")


CHECKPOINT_NAME = re.compile(r"^(epoch|step)_(\d+)$")


LAST_FILES = (INDEX_FILE, CONFIG_FILE, MANIFEST_FILE)


def kept_on_failure(what: str, folder: Path, upload: Callable[[], T], explain: Callable[[Exception], str] = str) -> T:
    """Run ``upload``; if it fails, raise an error that names the staged copy ``folder`` (which is kept)."""
    try:
        return upload()
    except Exception as e:
        raise CheckpointTransportError(f"{what} failed ({explain(e)}); the complete checkpoint is kept at {folder}", file=str(folder)) from e


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

