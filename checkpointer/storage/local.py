"""A checkpoint location on a local (or shared) file system: publishing is an atomic rename."""

from __future__ import annotations

import shutil
from pathlib import Path

from checkpointer.errors import CheckpointError, CheckpointNotFoundError
from checkpointer.format.folder import Folder, LocalFolder, fresh_dir, local_files
from checkpointer.format.hf_files import INDEX_FILE, files_to_fetch
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.storage.location import CHECKPOINT_NAME, PublishOptions
from checkpointer.storage.publish import replace_folder


class LocalLocation:
    """A folder on a local or shared file system; publishing is an atomic rename."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.url = str(self.path)

    def find(self, *, checkpoint_files: list[str] | None = None, streaming: bool = False, whole_folder: bool = False) -> None:
        """Nothing to pin or fetch: the files are read where they are (a node without them reads a
        copy of rank 0's: :func:`checkpointer.phases.open_folder` and :meth:`files_to_copy`)."""
        if not whole_folder and not self.path.is_dir():
            raise CheckpointNotFoundError(f"{self.path}: no such folder", url=str(self.path))

    def files_to_copy(self, checkpoint_files: list[str] | None = None) -> list[str]:
        """What a copy of this checkpoint needs: its index, weights, config, tokenizer and manifest."""
        names = {p.name for p in self.path.iterdir() if p.is_file()}
        files = files_to_fetch(names, lambda: (self.path / INDEX_FILE).read_bytes(), str(self.path), checkpoint_files)
        return files + [MANIFEST_FILE] * (MANIFEST_FILE in names)

    def download(self, found: None) -> None:
        pass

    def folder(self, found: None) -> Folder:
        if not self.path.is_dir():
            raise CheckpointNotFoundError(f"{self.path}: no such folder", url=str(self.path))
        return LocalFolder(self.path)

    def staging_dir(self, name: str) -> Path:
        return self.path / f".{name}.partial"

    def publish(self, folder: Path, name: str, *, options: PublishOptions = PublishOptions()) -> str:
        return self.checkpoint(name).replace_with(folder)

    def staging_folder(self) -> Path:
        """A fresh hidden folder beside this one (same file system, so publishing is a rename)."""
        return fresh_dir(self.path.parent / f".{self.path.name}.partial")

    def replace_with(self, folder: Path, *, options: PublishOptions = PublishOptions()) -> str:
        """Rename ``folder`` (from :meth:`staging_folder`) into place; an older folder here is replaced whole."""
        replace_folder(folder, self.path)
        return str(self.path)

    def list_files(self) -> dict[str, int]:
        if not self.path.is_dir():
            raise CheckpointNotFoundError(f"{self.path}: no such folder", url=str(self.path))
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

    def remove(self, name: str) -> None:
        target = self.path / name
        if not CHECKPOINT_NAME.match(name) or target.is_symlink() or target.resolve().parent != self.path.resolve():
            raise CheckpointError(f"{target}: refusing to remove something that is not a checkpoint folder of {self.path}", url=str(self.path), file=str(target))
        shutil.rmtree(target)

