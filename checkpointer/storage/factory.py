"""``make_location``: the location for a ``checkpoint_dir`` / ``output_dir`` value; ``checkpoint_file_names`` for ``checkpoint_files``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from checkpointer.errors import CheckpointArgumentError
from checkpointer.storage.local import LocalLocation
from checkpointer.storage.location import Location
from checkpointer.storage.urls import FsspecUrl, HubUrl, LocalPath, parse_location


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
        from checkpointer.storage.fsspec_location import FsspecLocation

        return FsspecLocation(parsed.url, storage_options or {})
    from checkpointer.storage.hub_location import HubLocation

    assert isinstance(parsed, HubUrl)
    return HubLocation(parsed, private=private)



def checkpoint_file_names(checkpoint_files: Sequence[str | Path] | dict | None, source: Location) -> list[str] | None:
    """torchtune's ``checkpoint_files``: a list of names (``str`` or ``Path``, relative to ``checkpoint_dir``
    or absolute inside it) or a dict with ``filename_format`` and ``max_filename``; None: the default files."""
    if isinstance(checkpoint_files, dict) or hasattr(checkpoint_files, "keys"):  # also omegaconf DictConfig
        if not {"filename_format", "max_filename"} <= set(checkpoint_files):
            raise CheckpointArgumentError(f"checkpoint_files {dict(checkpoint_files)!r}: expected filename_format and max_filename", key="checkpoint_files")
        count = int(checkpoint_files["max_filename"])
        return [checkpoint_files["filename_format"].format(str(i).zfill(5), str(count).zfill(5)) for i in range(1, count + 1)]
    if checkpoint_files is None:
        return None
    if isinstance(checkpoint_files, (str, Path)) or not hasattr(checkpoint_files, "__iter__"):
        raise CheckpointArgumentError(f"checkpoint_files {checkpoint_files!r}: expected a list of file names", key="checkpoint_files")
    return [_relative_file(f, source) for f in checkpoint_files] or None


def _relative_file(name: str | Path, source: Location) -> str:
    """A checkpoint file name relative to ``checkpoint_dir`` (an absolute path must lie inside a local one)."""
    path = Path(name)
    if not path.is_absolute():
        return path.as_posix()
    root = source.path.resolve() if isinstance(source, LocalLocation) else None
    if root is None or not path.resolve().is_relative_to(root):
        raise CheckpointArgumentError(f"checkpoint_files: {name} is not inside checkpoint_dir {source.url}", key="checkpoint_files")
    return path.resolve().relative_to(root).as_posix()
