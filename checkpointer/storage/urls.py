"""Parsing where a checkpoint lives: a local path, an fsspec URL, or ``hf://`` on the Hub.

``hf://[datasets/|spaces/]namespace/repo[@revision][/subfolder]``: a revision holding a
``/`` is written URL-encoded (``@exp%2F1``), as the Hub's own URLs do. Anything with
another ``scheme://`` goes to fsspec, whose protocol must be known. Mistakes (``s3:/x``,
``hf://repo``, an unknown scheme) are refused here, before any process group work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from checkpointer.errors import CheckpointArgumentError

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}


@dataclass(frozen=True)
class LocalPath:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class FsspecUrl:
    protocol: str
    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class HubUrl:
    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        prefix = {"model": ""}.get(self.repo_type, self.repo_type + "s/")
        revision = f"@{self.revision.replace('/', '%2F')}" if self.revision else ""
        return f"hf://{prefix}{self.repo_id}{revision}" + (f"/{self.subfolder}" if self.subfolder else "")

    @property
    def folder_prefix(self) -> str:
        """The repo paths below this folder start with it (``""`` at the repo root)."""
        return f"{self.subfolder}/" if self.subfolder else ""

    def with_subfolder(self, name: str) -> HubUrl:
        return HubUrl(self.repo_id, self.repo_type, self.revision, "/".join(p for p in (self.subfolder, name) if p))


ParsedLocation = LocalPath | FsspecUrl | HubUrl


def parse_location(value: str | Path, argument: str = "location") -> ParsedLocation:
    """Classify ``value``; ``argument`` names the setting in error messages."""
    if isinstance(value, Path):
        return LocalPath(value)
    text = str(value).strip()
    if not text:
        raise CheckpointArgumentError(f"{argument} is empty", key=argument)
    if text.startswith("hf://"):
        return _parse_hub(text, argument)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)", text)
    if scheme and len(scheme.group(1)) > 1:  # one letter would be a Windows drive
        if scheme.group(2) != "//":
            raise CheckpointArgumentError(f"{argument}={text!r}: did you mean {scheme.group(1)}://...? (URLs need '://')", url=text, key=argument)
        return _parse_fsspec(text, scheme.group(1).lower(), argument)
    return LocalPath(Path(text).expanduser())


def _parse_fsspec(text: str, protocol: str, argument: str) -> FsspecUrl:
    import fsspec

    if protocol == "file":
        return FsspecUrl(protocol, text)
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise CheckpointArgumentError(f"{argument}={text!r}: fsspec knows no protocol {protocol!r}", url=text, key=argument) from None
    except ImportError as e:
        raise CheckpointArgumentError(f"{argument}={text!r}: the {protocol!r} protocol needs a package: {e}", url=text, key=argument) from None
    if not text.split("://", 1)[1].strip("/"):
        raise CheckpointArgumentError(f"{argument}={text!r}: no bucket or path after {protocol}://", url=text, key=argument)
    return FsspecUrl(protocol, text.rstrip("/"))


def _parse_hub(text: str, argument: str) -> HubUrl:
    parts = text[len("hf://") :].strip("/").split("/")
    repo_type = "model"
    if parts and parts[0] in _REPO_TYPES:
        repo_type = _REPO_TYPES[parts.pop(0)]
    if len(parts) < 2:
        raise CheckpointArgumentError(f"{argument}={text!r}: expected hf://[datasets/]namespace/repo[@revision][/subfolder]", url=text, key=argument)
    namespace, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        revision = unquote(revision)
        if not revision:
            raise CheckpointArgumentError(f"{argument}={text!r}: empty revision after '@'", url=text, key=argument)
    for part in (namespace, repo):
        if not _REPO_PART.match(part) or ".." in part:
            raise CheckpointArgumentError(f"{argument}={text!r}: {part!r} is not a valid repo namespace or name", url=text, key=argument)
    subfolder = "/".join(parts[2:])
    if any(p in ("", ".", "..") for p in parts[2:]):
        raise CheckpointArgumentError(f"{argument}={text!r}: subfolder {subfolder!r} is not a clean relative path", url=text, key=argument)
    return HubUrl(f"{namespace}/{repo}", repo_type, revision, subfolder)
