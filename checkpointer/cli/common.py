"""What the commands share: a checkpoint opened by one process, publishing a built folder, the outcome line."""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from checkpointer.errors import CheckpointArgumentError, CheckpointFormatError, CheckpointNotFoundError
from checkpointer.format.folder import Folder, LocalFolder
from checkpointer.format.hf_files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, CheckpointFiles, read_checkpoint_files
from checkpointer.format.json_files import parse_json
from checkpointer.format.manifest import MANIFEST_FILE, Contents, files_of, parse_manifest
from checkpointer.format.peft import ADAPTER_DIR, ADAPTER_FILE
from checkpointer.mapping.key_maps import model_types_for_keys
from checkpointer.phases import hash_files
from checkpointer.runtime.progress import human_size
from checkpointer.storage.factory import make_location
from checkpointer.storage.local import LocalLocation
from checkpointer.storage.location import Location, PublishOptions
from checkpointer.storage.publish import seal
from checkpointer.storage.urls import LocalPath, parse_location

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_repo_id(value: object) -> bool:
    """Whether ``value`` looks like a bare Hub repo id (``namespace/name``)."""
    return isinstance(value, str) and bool(_REPO_ID.match(value))


@dataclass(frozen=True)
class Outcome:
    """What a command ends with: its exit code and one summary line (size, seconds, rate, where)."""

    code: int
    summary: str


@dataclass(frozen=True)
class ExportOptions:
    """What ``export`` writes: where, split how, in which dtype, and how to read DCP metadata."""

    to: str
    base: str | None = None
    model_type: str | None = None
    dtype: torch.dtype | None = None
    max_shard_size: int | str = "5GB"
    trust_pickle: bool = False
    private: bool = True
    message: str | None = None
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None


@dataclass
class Timer:
    """Seconds since the command started, and a rate line for the bytes it moved."""

    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def rate(self, nbytes: int) -> str:
        """``"1.20 GB in 3.4 s (0.35 GB/s)"``."""
        seconds = self.seconds
        speed = f" ({nbytes / 1e9 / seconds:.2f} GB/s)" if seconds > 0 and nbytes else ""
        return f"{human_size(nbytes)} in {seconds:.1f} s{speed}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtypes_name(dtypes: Iterable[torch.dtype]) -> str:
    """``"bfloat16"`` when every tensor has that dtype, else ``"mixed"``."""
    unique = set(dtypes)
    return dtype_name(unique.pop()) if len(unique) == 1 else "mixed"


def model_types(keys: Iterable[str], config: dict[str, Any] | None) -> list[str]:
    """The registered model types whose key layout these Hugging Face keys follow (narrowed by config.json)."""
    config = config or {}
    keys = list(keys)
    return model_types_for_keys(keys, config.get("tie_word_embeddings"), config.get("model_type")) if keys else []


@dataclass
class Checkpoint:
    """A location opened by this one process: every file with its size, and byte-range reads.

    Remote locations are read in place (``streaming``): only the bytes asked for are fetched.
    """

    location: Location
    files: dict[str, int]
    folder: Folder
    _subs: dict[str, Checkpoint] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, value: str, argument: str, storage_options: dict[str, Any] | None = None) -> Checkpoint:
        location = make_location(value, argument, storage_options)
        files = location.list_files()
        return cls(location, files, location.folder(location.find(streaming=True)))

    def describe(self, name: str = "") -> str:
        return self.folder.describe(name)

    def sub(self, path: str) -> Checkpoint:
        """The checkpoint's subfolder ``path`` (e.g. ``adapter``), opened the same way."""
        if not path:
            return self
        if path not in self._subs:  # opened once: on the Hub, opening asks for the file list
            location, prefix = self.location.subfolder(path), f"{path}/"
            files = {name[len(prefix) :]: size for name, size in self.files.items() if name.startswith(prefix)}
            self._subs[path] = Checkpoint(location, files, location.folder(location.find(streaming=True)))
        return self._subs[path]

    def reader(self, path: str) -> tuple[Folder, str]:
        """The folder that reads file ``path`` (which may lie in a subfolder) and its name there."""
        folder, _, name = path.rpartition("/")
        return self.sub(folder).folder, name

    def read_bytes(self, path: str) -> bytes:
        folder, name = self.reader(path)
        return folder.read(name, 0, self.files[path] if path in self.files else folder.size(name))  # listed: no size request

    def read_json(self, path: str) -> Any:
        """The parsed JSON file ``path``, or None when there is no such file."""
        if path not in self.files:
            return None
        return parse_json(self.read_bytes(path), self.describe(path))

    def config(self) -> dict[str, Any] | None:
        config = self.read_json(CONFIG_FILE)
        if config is not None and not isinstance(config, dict):
            raise CheckpointFormatError(f"{self.describe(CONFIG_FILE)}: not a JSON object", file=self.describe(CONFIG_FILE))
        return config

    def manifest(self) -> dict[str, Any] | None:
        """checkpointer's manifest (``checkpointer.json``), when the checkpoint has one."""
        return parse_manifest(self.read_bytes(MANIFEST_FILE), self.describe(MANIFEST_FILE)) if MANIFEST_FILE in self.files else None

    @property
    def has_weights(self) -> bool:
        return INDEX_FILE in self.files or SINGLE_FILE in self.files

    def adapter_dirs(self) -> list[str]:
        """Where PEFT adapters are: ``""`` (top level) and/or ``adapter``."""
        return [d for d in ("", ADAPTER_DIR) if f"{d}/{ADAPTER_FILE}".lstrip("/") in self.files]

    def weights(self) -> CheckpointFiles:
        """The Hugging Face weights, headers validated (raises at the first problem)."""
        if not self.has_weights:
            raise CheckpointNotFoundError(
                f"{self.describe()}: no Hugging Face weights here (no {INDEX_FILE} or {SINGLE_FILE}): check the path; "
                "a checkpoint holding only an adapter becomes weights with `checkpointer export`",
                url=self.describe(),
            )
        return read_checkpoint_files(self.folder)

    def tensor_files(self) -> CheckpointFiles:
        """The weights, or for an adapter-only checkpoint the adapter's tensors."""
        if self.has_weights:
            return self.weights()
        if ADAPTER_FILE in self.files:
            return read_checkpoint_files(self.folder, [ADAPTER_FILE])
        raise CheckpointNotFoundError(
            f"{self.describe()}: no weights here (no {INDEX_FILE}, {SINGLE_FILE} or {ADAPTER_FILE}); "
            "check the path, or see what it holds with `checkpointer inspect`",
            url=self.describe(),
        )


def base_location(value: str) -> str:
    """A base model named as in ``base_model_name_or_path``: a path, a URL, or a bare Hub repo id."""
    parsed = parse_location(value, "--base")
    if isinstance(parsed, LocalPath) and not parsed.path.exists() and is_repo_id(value):
        return f"hf://{value}"
    return value


def publish_built(
    destination: Location,
    build: Callable[[Path], None],
    *,
    command: str,
    message: str,
    card: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Build Hugging Face weights in the destination's staging area, then publish them there in one step.

    Like a checkpoint, the folder gets ``checkpointer.json`` (every file's size and sha256, what
    made it) last and is made read-only. A local destination is renamed into place (replacing a
    folder checkpointer wrote, only with ``overwrite``); a remote one gets one upload or one Hub
    commit. If the build fails the staging folder is removed; if the upload fails it is kept.
    """
    _refuse_replacing(destination, overwrite)
    staging = destination.staging_folder()
    try:
        build(staging)
        info = {"name": Path(destination.url).name, "made_by": f"checkpointer {command}", "world_size": 1,
                "contents": Contents(weights=True).as_json()}  # fmt: skip
        sizes = files_of(staging)
        with LocalFolder(staging) as folder:
            seal(staging, info, sizes, hash_files(folder, sizes))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    published = destination.replace_with(staging, options=PublishOptions(card=card, message=message))
    shutil.rmtree(staging, ignore_errors=True)
    return published


def _refuse_replacing(destination: Location, overwrite: bool) -> None:
    """A local destination is replaced whole: only a folder checkpointer wrote, and only when asked."""
    path = destination.path if isinstance(destination, LocalLocation) else None
    if path is None or not path.exists():
        return
    if not path.is_dir():
        raise CheckpointArgumentError(f"--to {path}: a file is in the way; remove it or choose another destination", file=str(path), key="--to")
    if not any(path.iterdir()):
        return
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointArgumentError(f"--to {path}: the folder exists and checkpointer did not write it; choose another destination (or remove it yourself)", file=str(path), key="--to")
    if not overwrite:
        raise CheckpointArgumentError(f"--to {path}: the folder exists; pass --overwrite to replace it whole, or choose another destination", file=str(path), key="--to")
