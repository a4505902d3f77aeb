"""DistributedHFCheckpointer: torchtune's checkpointer interface over DCP and HF safetensors.

Loading reads, on every rank, only the bytes of that rank's shards; saving writes, on
every rank, only that rank's bytes, straight into the final Hugging Face files. The same
code runs with one process (no process group) and with many.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from checkpointer.distributed import dcp_errors, is_distributed, on_all_ranks, rank, world_size
from checkpointer.errors import CheckpointError
from checkpointer.file_layout import FileLayout, plan_file_layout
from checkpointer.folders import Folder
from checkpointer.hf_files import CONFIG_FILE, CheckpointFiles, read_checkpoint_files
from checkpointer.hub_location import HubLocation
from checkpointer.layouts import Layout, get_layout
from checkpointer.locations import make_location
from checkpointer.load_planner import HFLoadPlanner
from checkpointer.matching import model_specs_from_checkpoint, plan_for_save
from checkpointer.model_config import ModelConfig
from checkpointer.publish import copy_support_files, fsync_tree, output_config, write_index
from checkpointer.save_planner import HFSavePlanner
from checkpointer.shards import global_spec
from checkpointer.storage_reader import SafetensorsReader
from checkpointer.storage_writer import SafetensorsWriter

log = logging.getLogger(__name__)

MODEL_KEY = "model"  # torchtune.training.MODEL_KEY

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = _DTYPES.get(name) or getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"save_dtype {value!r} is not a dtype (use fp32, bf16 or fp16)")
    return dtype


@dataclass(frozen=True)
class IOStats:
    """What the last load or save moved on this rank."""

    bytes: int
    seconds: float
    location: str

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


class DistributedHFCheckpointer:
    """Load and save Hugging Face safetensors checkpoints shard by shard.

    Args:
        checkpoint_dir: the base model in Hugging Face format: a local folder, an fsspec URL
            (``s3://bucket/llama``) or ``hf://namespace/repo[@revision][/subfolder]``.
        output_dir: where checkpoints are published, as ``epoch_{N}`` / ``step_{N}``: a local
            folder or fsspec URL (subfolders), or ``hf://namespace/repo`` (one commit each, at the
            repo root, tagged ``epoch-N`` / ``step-N``).
        model_type: torchtune model type name (``LLAMA3_2``, ``QWEN2``, ...).
        checkpoint_files: weight files to read; default: the index, else ``model.safetensors``.
        max_shard_size: file size limit when the base has no weight map to follow.
        save_dtype: dtype of saved weights (default: the model's).
        streaming: read remote weights by byte range, each rank only its own shards, instead
            of downloading the files once per node first.
        storage_options: fsspec options for URL locations (e.g. an S3 ``endpoint_url``).
        hub_private: create a missing Hub output repo as private (default True).
        process_group: the group whose ranks share the model (default: the world).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        output_dir: str | Path,
        model_type: Any,
        checkpoint_files: Sequence[str] | dict | None = None,
        *,
        max_shard_size: int | str = "5GB",
        save_dtype: str | torch.dtype | None = None,
        streaming: bool = False,
        storage_options: dict[str, Any] | None = None,
        hub_private: bool = True,
        process_group: dist.ProcessGroup | None = None,
        safe_serialization: bool = True,
        **unused: Any,
    ):
        if not safe_serialization:
            raise CheckpointError("safe_serialization=False is not supported: weights are only saved as safetensors")
        options = dict(storage_options or {})
        self.source = make_location(checkpoint_dir, "checkpoint_dir", options)
        self.destination = make_location(output_dir, "output_dir", options, private=hub_private)
        self.streaming = streaming
        self.training_info: dict[str, Any] = {}  # recipes add details for the model card
        self.model_type = model_type
        self.checkpoint_files = _file_list(checkpoint_files)
        self.max_shard_size = max_shard_size
        self.save_dtype = _dtype(save_dtype)
        self.process_group = process_group
        self.last_load: IOStats | None = None
        self.last_save: IOStats | None = None
        if unused:
            log.debug("ignoring torchtune checkpointer arguments %s", sorted(unused))

    # ---- what the base checkpoint is ---------------------------------------------------

    @cached_property
    def source_folder(self) -> Folder:
        """The base checkpoint's files (collective: remote sources are fetched or opened here)."""
        return self.source.open(self.process_group, self.streaming, self.checkpoint_files)

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        folder = self.source_folder
        return on_all_ranks(lambda: _read_config(folder), self.process_group).raw

    @cached_property
    def layout(self) -> Layout:
        return get_layout(self.model_type, ModelConfig.from_dict(self.config_dict))

    def base_files(self) -> CheckpointFiles:
        """The base checkpoint's files and headers, read (and checked) on every rank."""
        folder = self.source_folder
        return on_all_ranks(lambda: read_checkpoint_files(folder, self.checkpoint_files), self.process_group)

    # ---- loading ------------------------------------------------------------------------

    def load_checkpoint(self) -> dict[str, Any]:
        """torchtune's interface: ``{"model": full state dict with torchtune keys}``."""
        files = self.base_files()
        specs = on_all_ranks(
            lambda: model_specs_from_checkpoint(self.layout, files.tensors, self.source.describe()), self.process_group
        )
        state_dict = {key: torch.empty(shape, dtype=dtype) for key, (dtype, shape) in specs.items()}
        self._load(state_dict, files)
        return {MODEL_KEY: state_dict}

    def load_model(self, model: nn.Module) -> None:
        """Load the base weights in place into ``model`` (plain, or sharded with FSDP2)."""
        state_dict = model.state_dict()
        on_all_ranks(lambda: _check_materialized(state_dict), self.process_group)
        self._load(state_dict, self.base_files())

    def _load(self, state_dict: dict[str, Any], files: CheckpointFiles) -> None:
        reader, started = SafetensorsReader(files), time.perf_counter()
        with _quiet_dcp(), dcp_errors(self.process_group), torch.no_grad():
            dcp.load(
                state_dict,
                storage_reader=reader,
                planner=HFLoadPlanner(self.layout),
                process_group=self.process_group,
                no_dist=not is_distributed(),
            )
        self.last_load = IOStats(reader.bytes_read, time.perf_counter() - started, files.folder.describe())

    # ---- saving -------------------------------------------------------------------------

    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
        *,
        step: int | None = None,
    ) -> str:
        """torchtune's interface: save ``state_dict["model"]``; returns where it was published.

        Every rank that holds shards calls this; each writes only its own bytes.
        """
        if MODEL_KEY not in state_dict:
            raise CheckpointError(f"save_checkpoint: state_dict has no {MODEL_KEY!r} entry (keys: {sorted(state_dict)})")
        name = f"step_{step}" if step is not None else f"epoch_{epoch}"
        self.save_weights(state_dict[MODEL_KEY], name)
        published = self.destination.describe(name)
        if rank(self.process_group) == 0:
            log.info("saved checkpoint to %s", published)
        return published

    def save_weights(self, model_state: dict[str, Any], name: str) -> FileLayout:
        """Write ``model_state`` as the Hugging Face checkpoint ``name`` of the output location."""
        folder, base_config, layout = self.source_folder, self.config_dict, self.layout
        specs, destinations, file_layout = on_all_ranks(lambda: self._plan_save(model_state), self.process_group)
        tied = not any(d.hf_key in layout.tied for d in destinations.values())
        dtypes = {s.dtype for s in specs.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        card = self._card(name, dtype)

        def publish(staging: Path) -> None:
            copy_support_files(folder, staging, output_config(base_config, dtype, tied))
            write_index(staging, file_layout)
            fsync_tree(staging)
            self.destination.publish(staging, name, card)

        staging = self.destination.staging_dir(name)
        writer, started = SafetensorsWriter(staging, file_layout, publish), time.perf_counter()
        with _quiet_dcp(), dcp_errors(self.process_group), torch.no_grad():
            dcp.save(
                model_state,
                storage_writer=writer,
                planner=HFSavePlanner(layout, specs, destinations),
                process_group=self.process_group,
                no_dist=not is_distributed(),
            )
        self.last_save = IOStats(writer.bytes_written, time.perf_counter() - started, self.destination.describe(name))
        return file_layout

    def _card(self, name: str, dtype: torch.dtype | None) -> dict[str, Any]:
        base = self.source.url.repo_id if isinstance(self.source, HubLocation) else None
        return {
            "base_model": base,
            "checkpoint": name,
            "model_type": getattr(self.model_type, "name", self.model_type),
            "dtype": str(dtype).removeprefix("torch.") if dtype else "mixed",
            "world_size": world_size(self.process_group),
            "training": dict(self.training_info),
        }

    def _plan_save(self, model_state: dict[str, Any]):
        model_specs = {key: global_spec(key, value) for key, value in model_state.items()}
        if self.save_dtype is not None:
            model_specs = {k: (self.save_dtype if dt.is_floating_point else dt, s) for k, (dt, s) in model_specs.items()}
        specs, destinations = plan_for_save(self.layout, model_specs)
        weight_map = self._base_weight_map()
        return specs, destinations, plan_file_layout(specs, weight_map, self.max_shard_size)

    def _base_weight_map(self) -> dict[str, str] | None:
        try:
            files = read_checkpoint_files(self.source_folder, self.checkpoint_files)
        except CheckpointError:
            return None
        return {key: entry.file for key, entry in files.tensors.items()}


def _file_list(checkpoint_files: Sequence[str] | dict | None) -> list[str] | None:
    """torchtune allows a list of names or a dict with ``filename_format`` and ``max_filename``."""
    if checkpoint_files is None or isinstance(checkpoint_files, (list, tuple)):
        return list(checkpoint_files) if checkpoint_files else None
    if isinstance(checkpoint_files, dict) and {"filename_format", "max_filename"} <= set(checkpoint_files):
        count = int(checkpoint_files["max_filename"])
        return [checkpoint_files["filename_format"].format(str(i).zfill(5), str(count).zfill(5)) for i in range(1, count + 1)]
    raise CheckpointError(f"checkpoint_files {checkpoint_files!r}: expected a list of file names")


def _read_config(folder: Folder) -> ModelConfig:
    if not folder.exists(CONFIG_FILE):
        raise CheckpointError(f"{folder.describe(CONFIG_FILE)}: missing; the model's dimensions come from it")
    return ModelConfig.from_json(folder.read(CONFIG_FILE, 0, folder.size(CONFIG_FILE)), folder.describe(CONFIG_FILE))


def _check_materialized(state_dict: dict[str, Any]) -> None:
    meta = [key for key, value in state_dict.items() if isinstance(value, torch.Tensor) and value.is_meta]
    if meta:
        raise CheckpointError(
            f"{len(meta)} model tensors are on the meta device (e.g. {meta[0]}): call model.to_empty(device=...) first"
        )


class _quiet_dcp(warnings.catch_warnings):
    """DCP warns on every single-process call that it assumes no process group; we mean it."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return self
