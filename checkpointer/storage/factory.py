"""``make_location``: the location for a ``checkpoint_dir`` / ``output_dir`` value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

