"""Where checkpoints are read from and published to: local folders, fsspec URLs, the Hub.

Every location answers the same questions, each in one process (no process groups here: the
collective steps that run them on the right ranks are :mod:`checkpointer.phases`):
- ``url``: where it is (the address messages show and ``save_checkpoint`` returns);
- ``find(...)`` (one process), ``download(found)`` (one process per node), ``folder(found)``
  (every process): a :class:`Folder` to read the checkpoint here. ``find`` pins what to read
  (the Hub's commit, the files needed) into a picklable record; remote locations download
  those files, or with ``streaming`` read byte ranges on demand;
- ``staging_dir(name)``: the local folder where checkpoint ``name`` is assembled;
- ``publish(folder, name, options=...)``: make it visible, complete, in one step;
- ``staging_folder()`` / ``replace_with(folder, options=...)``: the same for the location itself
  (what the command line's ``consolidate``, ``export`` and ``push`` write);
- ``list_files()`` (one process): every file here, with its size;
- ``checkpoint(name)``: where checkpoint ``name`` can be read back;
- ``checkpoint_names()`` / ``remove(name)``: the complete checkpoints (by name; their manifests
  tell their order), for resuming and pruning;
- ``read_file(path)``: one small file of a checkpoint.

Publishing puts ``LAST_FILES`` last, so that on stores without atomic rename a reader
sees a checkpoint as complete (``checkpointer.json`` present) only when it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from checkpointer.errors import CheckpointTransportError
from checkpointer.format.folder import Folder, fresh_dir, local_files
from checkpointer.format.hf_files import CONFIG_FILE, INDEX_FILE
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.runtime.cache import cache_root, url_key

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


def remote_staging_dir(url: str, name: str) -> Path:
    """The local folder where checkpoint ``name`` of the remote location ``url`` is assembled."""
    return cache_root() / "staging" / url_key(url) / name


def remote_staging_folder(url: str) -> Path:
    """A fresh local folder where the remote location ``url`` itself is assembled."""
    return fresh_dir(cache_root() / "staging" / f"{url_key(url)}-here")


@dataclass(frozen=True)
class PublishOptions:
    """What a location that keeps history (the Hub) records with a publication; the others have no use for it.

    ``card``: the model card's facts (a README is added unless the user wrote one; None: no card);
    ``message``: the commit message; ``tag``: a tag to (re)point at the commit.
    """

    card: dict[str, Any] | None = None
    message: str | None = None
    tag: str | None = None


class Location(Protocol):
    """A place checkpoints live. Every method runs in one process; none takes a process group."""

    url: str

    def find(self, *, checkpoint_files: list[str] | None = None, streaming: bool = False, whole_folder: bool = False) -> Any:
        """What to read here (picklable): the weights and support files, or with ``whole_folder`` every file below."""

    def download(self, found: Any) -> None:
        """Bring ``found``'s files to this node's disk (a no-op for local folders and streaming reads)."""

    def folder(self, found: Any) -> Folder:
        """A folder reading ``found``'s files (after ``download`` on this node)."""

    def staging_dir(self, name: str) -> Path: ...

    def publish(self, folder: Path, name: str, *, options: PublishOptions = PublishOptions()) -> str: ...

    def staging_folder(self) -> Path: ...

    def replace_with(self, folder: Path, *, options: PublishOptions = PublishOptions()) -> str: ...

    def list_files(self) -> dict[str, int]: ...

    def checkpoint(self, name: str) -> Location: ...

    def subfolder(self, path: str) -> Location: ...

    def checkpoint_names(self) -> list[str]: ...

    def remove(self, name: str) -> None: ...

    def read_file(self, path: str) -> bytes | None: ...
