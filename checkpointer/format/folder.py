"""Folders that checkpoint files are read from, by name, with exact byte ranges.

A folder hands out bytes of named files and refuses names that would leave it
(absolute paths, ``..``, symlinks pointing outside). :class:`LocalFolder` reads with
``os.preadv`` straight into caller buffers (one or many pieces per call), and maps whole
files (copy-on-write) for loads that hand out full tensors.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import shutil
import threading
from pathlib import Path
from typing import Protocol, Sequence

from checkpointer.errors import CheckpointFormatError, CheckpointNotFoundError
from checkpointer.format.box_runs import ByteRun, merge_runs
from checkpointer.format.vectored import byte_count, fill_pieces, preadv_all, preadv_runs, split_pieces

REMOTE_MERGE_GAP = 1 << 20  # about what one HTTP round trip costs, in bytes of transfer


class Folder(Protocol):
    """Read access to the files of one checkpoint folder.

    ``merge_gap``: byte ranges of one file at most this far apart are cheaper fetched as one
    read (remote folders, where each request costs a round trip) than apart (local files: 0).
    ``concurrent_reads``: whether ``read_into`` may run on several threads at once.
    """

    merge_gap: int
    concurrent_reads: bool

    def describe(self, name: str = "") -> str:
        """A human-readable location of ``name`` (or of the folder) for messages."""

    def exists(self, name: str) -> bool:
        """Whether the folder holds a file ``name``."""

    def size(self, name: str) -> int:
        """The size of ``name`` in bytes, or an error naming it."""

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``, or an error naming the file."""

    def read_into(self, name: str, offset: int, out: Sequence[memoryview]) -> None:
        """Fill the pieces ``out``, back to back, with the bytes from ``offset``, or raise naming the file."""

    def read_runs(self, name: str, runs: Sequence[ByteRun], out: Sequence[memoryview]) -> int:
        """Fill ``out``, back to back, with the bytes of the file's ``runs``; the bytes fetched (gaps a merged read took included)."""

    def mapped(self, name: str) -> mmap.mmap | None:
        """The whole file as a private (copy-on-write) memory map, or None where it cannot be mapped (remote, empty)."""

    def close(self) -> None:
        """Release open files."""


def local_files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative POSIX path -> size), in sorted order."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def make_dirs(path: Path) -> None:
    """``path`` and its missing parents, each created 0755 (less under a stricter umask): never world-writable."""
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        missing.mkdir(mode=0o755, exist_ok=True)


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path`` (a leftover of an interrupted run is removed)."""
    if path.exists():
        shutil.rmtree(path)
    make_dirs(path)
    return path


class RangeReadFolder:
    """The reads of a remote folder, made of its ``read`` (one request per range): runs near each other come in one request."""

    merge_gap = REMOTE_MERGE_GAP
    concurrent_reads = False

    def read(self, name: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def read_into(self, name: str, offset: int, out: Sequence[memoryview]) -> None:
        fill_pieces(out, self.read(name, offset, byte_count(out)))

    def read_runs(self, name: str, runs: Sequence[ByteRun], out: Sequence[memoryview]) -> int:
        per_run, fetched = iter(split_pieces(out, runs)), 0
        for span, inside in _spans(runs, self.merge_gap):
            if len(inside) == 1:
                self.read_into(name, span[0], next(per_run))
            else:
                data = memoryview(self.read(name, span[0], span[1]))
                for offset, length in inside:
                    fill_pieces(next(per_run), data[offset - span[0] : offset - span[0] + length])
            fetched += span[1]
        return fetched


def _spans(runs: Sequence[ByteRun], max_gap: int) -> list[tuple[ByteRun, Sequence[ByteRun]]]:
    """Runs grouped into file ranges to fetch, each with the runs it holds."""
    grouped: list[tuple[ByteRun, Sequence[ByteRun]]] = []
    position = 0
    for span in merge_runs(list(runs), max_gap):
        end = position
        while end < len(runs) and runs[end][0] < span[0] + span[1]:
            end += 1
        grouped.append((span, runs[position:end]))
        position = end
    return grouped


def truncated(where: str, wanted_end: int, file_end: int) -> CheckpointFormatError:
    """The error for a file ``where`` that ends at ``file_end``, before byte ``wanted_end`` that a read needs."""
    return CheckpointFormatError(f"{where}: truncated: wanted bytes up to {wanted_end}, the file ends at {file_end}", file=where)


def check_relative_name(name: str, folder: str) -> str:
    """A file name from an index must stay inside its folder."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name:
        raise CheckpointFormatError(
            f"{folder}: file name {name!r} is not a relative path inside the folder; a checkpoint may only name files inside it",
            file=folder,
        )
    if ".." in name.split("/") or posixpath.normpath(name).startswith(".."):
        raise CheckpointFormatError(f"{folder}: file name {name!r} leaves the folder; a checkpoint may only name files inside it", file=folder)
    return name


class LocalFolder:
    """A checkpoint folder on a local (or mounted) file system.

    Symlinks may point anywhere inside ``trusted_root`` (default: the folder itself); the
    Hugging Face cache, for example, links snapshot files to blobs two levels up.
    """

    merge_gap = 0
    concurrent_reads = True

    def __init__(self, root: str | os.PathLike, trusted_root: str | os.PathLike | None = None):
        self.root = Path(root)
        self._real_root = Path(trusted_root or root).resolve()
        self._fds: dict[str, int] = {}
        self._opening = threading.Lock()  # one descriptor per file, whichever thread reads it first

    def describe(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def path(self, name: str) -> Path:
        """The path of ``name``, refusing names or symlinks that lead outside the folder."""
        path = self.root / check_relative_name(name, str(self.root))
        try:
            resolved = path.resolve()
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise CheckpointFormatError(f"{self.describe(name)}: cannot be resolved ({e}); replace it with the file", file=self.describe(name)) from None
        if not resolved.is_relative_to(self._real_root):
            raise CheckpointFormatError(
                f"{self.describe(name)}: a symlink leading outside {self.root} (to {resolved}); "
                "only files inside the checkpoint folder are read: copy the file in instead of linking to it",
                file=self.describe(name),
            )
        return path

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.describe(name)}: file not found", file=self.describe(name)) from None

    def read(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(name, offset, [memoryview(buffer)])
        return bytes(buffer)

    def read_into(self, name: str, offset: int, out: Sequence[memoryview]) -> None:
        done, wanted = preadv_all(self._fd(name), out, offset), byte_count(out)
        if done < wanted:
            raise truncated(self.describe(name), offset + wanted, offset + done)

    def read_runs(self, name: str, runs: Sequence[ByteRun], out: Sequence[memoryview]) -> int:
        """Each run straight into its part of ``out`` with ``preadv``: one call per run."""
        done, wanted = preadv_runs(self._fd(name), out, runs), sum(length for _, length in runs)
        if done < wanted:
            raise truncated(self.describe(name), max(offset + length for offset, length in runs), self.size(name))
        return done

    def mapped(self, name: str) -> mmap.mmap | None:
        """Writes into the map change this process's copy only, never the file.

        The file must not be truncated in place while views of the map are alive (reading
        past the new end raises SIGBUS); checkpoints are published by rename, which is safe.
        """
        if self.size(name) == 0:
            return None
        return mmap.mmap(self._fd(name), 0, access=mmap.ACCESS_COPY)

    def _fd(self, name: str) -> int:
        with self._opening:
            if name not in self._fds:
                try:
                    self._fds[name] = os.open(self.path(name), os.O_RDONLY)
                except FileNotFoundError:
                    raise CheckpointNotFoundError(f"{self.describe(name)}: file not found", file=self.describe(name)) from None
            return self._fds[name]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> LocalFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # a folder that is about to be renamed or pruned must not keep its files open
