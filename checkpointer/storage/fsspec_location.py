"""Checkpoints on any fsspec file system (``s3://``, ``gs://``, ``memory://``, ...).

Loading downloads the needed files once per node into the local cache (local rank 0
fetches, the others wait), or with ``streaming`` reads each rank's byte ranges directly.
Publishing uploads a staged folder file by file in parallel, with the index and then
``config.json`` last, so a listing shows a checkpoint only when it is complete.
"""

from __future__ import annotations

import concurrent.futures
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from checkpointer.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, CheckpointTransportError
from checkpointer.format.folder import Folder, LocalFolder, RangeReadFolder, check_relative_name
from checkpointer.format.hf_files import INDEX_FILE, files_to_fetch
from checkpointer.format.json_files import parse_json, write_json
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.runtime.cache import cache_root, url_key
from checkpointer.runtime.progress import byte_bar
from checkpointer.runtime.retry import with_retries
from checkpointer.storage.location import (
    CHECKPOINT_NAME,
    LAST_FILES,
    PublishOptions,
    kept_on_failure,
    remote_staging_dir,
    remote_staging_folder,
    upload_order,
)

_PARALLEL = 8
_MANIFEST = ".checkpointer-source.json"


class FsspecFolder(RangeReadFolder):
    """Byte-range reads of the files under one fsspec folder."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str):
        self.fs, self.root, self.url = fs, root.rstrip("/"), url.rstrip("/")
        self._sizes: dict[str, int] = {}

    def describe(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def _path(self, name: str) -> str:
        return f"{self.root}/{check_relative_name(name, self.url)}"

    def exists(self, name: str) -> bool:
        return with_retries(lambda: self.fs.isfile(self._path(name)), f"checking {self.describe(name)}")

    def size(self, name: str) -> int:
        if name not in self._sizes:
            try:
                self._sizes[name] = with_retries(lambda: self.fs.size(self._path(name)), f"size of {self.describe(name)}")
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{self.describe(name)}: file not found", url=self.url, file=self.describe(name)) from None
        return self._sizes[name]

    def read(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        try:
            data = with_retries(
                lambda: self.fs.cat_file(self._path(name), start=offset, end=offset + length), f"reading {self.describe(name)}"
            )
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.describe(name)}: file not found", url=self.url, file=self.describe(name)) from None
        except Exception as e:  # noqa: BLE001 - transient errors were retried; report what is left
            raise CheckpointTransportError(f"{self.describe(name)}: reading {length} bytes at {offset} failed after retries ({e})", url=self.url, file=self.describe(name)) from e
        if len(data) != length:
            raise CheckpointFormatError(
                f"{self.describe(name)}: truncated: wanted {length} bytes at {offset}, got {len(data)}",
                url=self.url, file=self.describe(name),
            )
        return data

    def mapped(self, name: str) -> None:
        """Remote files are read, not mapped."""
        return None

    def names(self) -> set[str]:
        """The file names directly in the folder."""
        entries = with_retries(lambda: self.fs.ls(self.root, detail=True), f"listing {self.url}")
        return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FsspecFiles:
    """What :meth:`FsspecLocation.find` found to read: files to download, a streaming read, or the whole folder."""

    names: tuple[str, ...] = ()
    streaming: bool = False
    whole_folder: bool = False


class FsspecLocation:
    """A folder URL on an fsspec file system."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError, TypeError) as e:
            raise CheckpointTransportError(f"{url}: cannot open this location: {e}", url=url) from None

    def _url_of(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def remote(self) -> FsspecFolder:
        return FsspecFolder(self.fs, self.root, self.url)

    def find(self, *, checkpoint_files: list[str] | None = None, streaming: bool = False, whole_folder: bool = False) -> FsspecFiles:
        if whole_folder:
            return FsspecFiles(whole_folder=True)
        if streaming:
            return FsspecFiles(streaming=True)
        return FsspecFiles(tuple(self._needed(checkpoint_files)))

    def download(self, found: FsspecFiles) -> None:
        if found.whole_folder:
            self._download_folder()
        elif not found.streaming:
            self._download(list(found.names), self._cache_dir())

    def folder(self, found: FsspecFiles) -> Folder:
        return self.remote() if found.streaming else LocalFolder(self._cache_dir())

    def _cache_dir(self) -> Path:
        return cache_root() / "downloads" / url_key(self.url)

    def _needed(self, checkpoint_files) -> list[str]:
        remote = self.remote()
        try:
            available = remote.names()
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.url}: no such folder", url=self.url) from None
        return files_to_fetch(available, lambda: remote.read(INDEX_FILE, 0, remote.size(INDEX_FILE)), self.url, checkpoint_files)

    def _download(self, names: list[str], target: Path) -> None:
        """Fetch ``names`` into ``target``, skipping files whose remote identity is unchanged."""
        target.mkdir(parents=True, exist_ok=True)
        manifest_path = target / _MANIFEST
        manifest = parse_json(manifest_path.read_bytes(), str(manifest_path)) if manifest_path.exists() else {}
        keys = {n: str(with_retries(lambda n=n: self.fs.ukey(f"{self.root}/{n}"), f"checking {self._url_of(n)}")) for n in names}
        todo = [n for n in names if manifest.get(n) != keys[n] or not (target / n).is_file()]
        sizes = {n: self.remote().size(n) for n in todo}
        with byte_bar(sum(sizes.values()), f"download {self.url}") as bar, concurrent.futures.ThreadPoolExecutor(_PARALLEL) as pool:
            for name in pool.map(lambda n: self._fetch(n, target), todo):
                bar.update(sizes[name])
                manifest[name] = keys[name]
        write_json(manifest_path, manifest)

    def _fetch(self, name: str, target: Path) -> str:
        partial = target / f".{name}.download"
        with_retries(lambda: self.fs.get_file(f"{self.root}/{name}", str(partial)), f"downloading {self._url_of(name)}")
        partial.replace(target / name)
        return name

    def staging_dir(self, name: str) -> Path:
        return remote_staging_dir(self.url, name)

    def publish(self, folder: Path, name: str, *, options: PublishOptions = PublishOptions()) -> str:
        """Upload ``folder`` as ``url/name`` (see :meth:`replace_with`), then remove the staged copy."""
        published = self.checkpoint(name).replace_with(folder)
        shutil.rmtree(folder, ignore_errors=True)
        return published

    def staging_folder(self) -> Path:
        return remote_staging_folder(self.url)

    def replace_with(self, folder: Path, *, options: PublishOptions = PublishOptions()) -> str:
        """Upload ``folder``'s files here: in parallel, then index, config and manifest, in order; ``folder`` is kept."""
        sizes = upload_order(folder)
        last = [f for f in sizes if f in LAST_FILES]
        first = [f for f in sizes if f not in LAST_FILES]

        def upload() -> str:
            self._remove_markers(last)
            with byte_bar(sum(sizes.values()), f"upload {self.url}") as bar, concurrent.futures.ThreadPoolExecutor(_PARALLEL) as pool:
                for uploaded in pool.map(lambda n: self._put(folder, n), first):
                    bar.update(sizes[uploaded])
                for n in last:
                    bar.update(sizes[self._put(folder, n)])
            return self.url

        return kept_on_failure(f"upload to {self.url}", folder, upload, lambda e: f"{type(e).__name__}: {e}")

    def list_files(self) -> dict[str, int]:
        try:
            found = with_retries(lambda: self.fs.find(self.root, detail=True), f"listing {self.url}")
        except FileNotFoundError:
            found = {}
        prefix = self.root.rstrip("/") + "/"
        files = {n[len(prefix) :]: info.get("size") or 0 for n, info in sorted(found.items()) if n.startswith(prefix) and info.get("type") == "file"}
        if not files:
            raise CheckpointNotFoundError(f"{self.url}: no such folder, or it is empty", url=self.url)
        return files

    def _remove_markers(self, markers: list[str]) -> None:
        """Re-publishing a name: hide the old checkpoint first, so no mix is ever visible as complete."""
        for n in reversed(markers):
            path = f"{self.root}/{n}"
            if with_retries(lambda: self.fs.exists(path), f"checking {path}"):
                with_retries(lambda: self.fs.rm_file(path), f"removing {path}")

    def _put(self, folder: Path, name: str) -> str:
        target = f"{self.root}/{name}"
        if "/" in name:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with_retries(lambda: self.fs.put_file(str(folder / name), target), f"uploading {name}")
        return name

    def checkpoint(self, name: str) -> FsspecLocation:
        return FsspecLocation(self._url_of(name), self.storage_options)

    def subfolder(self, path: str) -> FsspecLocation:
        return FsspecLocation(self._url_of(path), self.storage_options) if path else self

    def checkpoint_names(self) -> list[str]:
        try:
            entries = with_retries(lambda: self.fs.ls(self.root, detail=True), f"listing {self.url}")
        except FileNotFoundError:
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]
        complete = [n for n in names if CHECKPOINT_NAME.match(n) and self.fs.isfile(f"{self.root}/{n}/{MANIFEST_FILE}")]
        return sorted(complete)

    def read_file(self, path: str) -> bytes | None:
        try:
            return with_retries(lambda: self.fs.cat_file(f"{self.root}/{path}"), f"reading {self._url_of(path)}")
        except FileNotFoundError:
            return None

    def _download_folder(self) -> None:
        """A fresh local copy of every file below this folder."""
        target = self._cache_dir()
        if target.exists():
            shutil.rmtree(target)
        with_retries(lambda: self.fs.get(f"{self.root}/", str(target) + "/", recursive=True), f"downloading {self.url}")

    def remove(self, name: str) -> None:
        if not CHECKPOINT_NAME.match(name):
            raise CheckpointError(f"{self._url_of(name)}: refusing to remove something that is not a checkpoint", url=self.url, file=self._url_of(name))
        with_retries(lambda: self.fs.rm(f"{self.root}/{name}", recursive=True), f"removing {self._url_of(name)}")
