"""Resumable training state (optimizer, LR scheduler, progress, data position, RNG) in DCP's format.

DCP's sharded format lets a state saved on N ranks load on M ranks: optimizer moments
of FSDP2 parameters are DTensors, resharded on load. Two things in DCP's default
storage would unpickle arbitrary objects, so they are replaced here:
- the ``.metadata`` file is written and read as JSON (``.metadata.json``), never pickled;
- non-tensor values are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.storage import WriteResult

from checkpointer.errors import CheckpointFormatError, CheckpointNotFoundError
from checkpointer.format.json_files import parse_json
from checkpointer.format.manifest import TRAINING_STATE_DIR
from checkpointer.runtime.distributed import dcp_errors, is_distributed, rank

METADATA_FILE = ".metadata.json"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError(f"{METADATA_FILE}: unknown dtype {name!r}", file=METADATA_FILE, key=name)
    return dtype


def _entry_to_json(value: TensorStorageMetadata | BytesStorageMetadata) -> dict[str, Any]:
    if isinstance(value, BytesStorageMetadata):
        return {"kind": "bytes"}
    return {
        "kind": "tensor",
        "dtype": str(value.properties.dtype),
        "size": list(value.size),
        "chunks": [[list(c.offsets), list(c.sizes)] for c in value.chunks],
    }


def _entry_from_json(raw: dict[str, Any]) -> TensorStorageMetadata | BytesStorageMetadata:
    if raw["kind"] == "bytes":
        return BytesStorageMetadata()
    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in raw["chunks"]]
    return TensorStorageMetadata(TensorProperties(dtype=_dtype(raw["dtype"])), torch.Size(raw["size"]), chunks)


def metadata_to_json(metadata: Metadata) -> dict[str, Any]:
    """DCP metadata as plain JSON (no pickled objects)."""
    storage = [
        {
            "fqn": index.fqn,
            "offset": list(index.offset) if index.offset is not None else None,
            "index": index.index,
            "path": info.relative_path,
            "start": info.offset,
            "length": info.length,
            "transforms": list(info.transform_descriptors or []),
        }
        for index, info in (metadata.storage_data or {}).items()
    ]
    planner = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return {
        "version": metadata.version,
        "state_dict_metadata": {k: _entry_to_json(v) for k, v in metadata.state_dict_metadata.items()},
        "planner_data": {k: list(v) for k, v in planner.items()},
        "storage_data": storage,
    }


def metadata_from_json(raw: dict[str, Any]) -> Metadata:
    """The inverse of :func:`metadata_to_json`."""
    storage = {
        MetadataIndex(e["fqn"], torch.Size(e["offset"]) if e["offset"] is not None else None, e["index"]): _StorageInfo(
            e["path"], e["start"], e["length"], e["transforms"] or None
        )
        for e in raw["storage_data"]
    }
    return Metadata(
        {k: _entry_from_json(v) for k, v in raw["state_dict_metadata"].items()},
        planner_data={k: tuple(v) for k, v in raw["planner_data"].items()},
        storage_data=storage,
        storage_meta=StorageMeta(),
        version=raw.get("version"),
    )


class JsonMetadataWriter(FileSystemWriter):
    """DCP's file-system writer, with the metadata file written as JSON."""

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        path = Path(self.path) / METADATA_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(metadata_to_json(metadata)))
        partial.replace(path)


def parse_metadata_json(text: str | bytes, where: str) -> Metadata:
    """DCP metadata from the text of a ``.metadata.json`` (``where`` names it in errors)."""
    raw = parse_json(text, where)
    try:
        return metadata_from_json(raw)
    except CheckpointFormatError:
        raise  # names what is wrong already (a ValueError too)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{where}: invalid training state metadata ({e})", file=where) from None


class JsonMetadataReader(FileSystemReader):
    """DCP's file-system reader, with the metadata read from JSON (parsed once per reader)."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = self._read_json_metadata()
        return self._metadata

    def reset(self, checkpoint_id: Any = None) -> None:
        super().reset(checkpoint_id)
        self._metadata = None  # the path may have changed

    def _read_json_metadata(self) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: missing: this is not a checkpointer training state", file=str(path)) from None
        return parse_metadata_json(text, str(path))


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:  # torch's text advises weights_only=False: never repeat that
            found = re.search(r"Unsupported global: GLOBAL \S+", str(e))
            raise CheckpointFormatError(
                f"{TRAINING_STATE_DIR}: entry {read_item.dest_index.fqn!r} is a pickle of something other than plain data "
                f"({found.group(0) if found else 'refused by weights_only loading'}); checkpointer never writes such "
                "entries, so this training state was altered: do not load it",
                key=read_item.dest_index.fqn,
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def save_training_state(state: dict[str, Any], folder: Path, group: dist.ProcessGroup | None = None) -> None:
    """Save ``state`` (collective) into ``folder`` in DCP's sharded format."""
    with dcp_errors(group):
        dcp.save(state, storage_writer=JsonMetadataWriter(folder), planner=DefaultSavePlanner(), process_group=group, no_dist=not is_distributed())


def stored_keys(reader: JsonMetadataReader) -> set[str]:
    """The flattened keys a saved training state holds (its metadata, read once by ``reader``)."""
    return set(reader.read_metadata().state_dict_metadata)


def load_training_state(state: dict[str, Any], reader: JsonMetadataReader, group: dist.ProcessGroup | None = None) -> None:
    """Load into ``state`` in place (collective) with ``reader``; shapes may be sharded differently than when saved."""
    with dcp_errors(group):
        dcp.load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner(), process_group=group, no_dist=not is_distributed())


def rng_state() -> dict[str, Any]:
    """This process's random number generator states (torch CPU/CUDA and Python's)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_key() -> str:
    """Each rank's RNG state is its own entry, so a resume on other ranks can tell what exists."""
    return f"rng_rank_{rank()}"
