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

from checkpointer.distributed import dcp_errors, is_distributed, on_all_ranks, rank
from checkpointer.errors import CheckpointError
from checkpointer.file_layout import FileLayout, plan_file_layout
from checkpointer.folders import Folder, LocalFolder
from checkpointer.hf_files import CONFIG_FILE, CheckpointFiles, read_checkpoint_files
from checkpointer.layouts import Layout, get_layout
from checkpointer.load_planner import HFLoadPlanner
from checkpointer.matching import model_specs_from_checkpoint, plan_for_save
from checkpointer.model_config import ModelConfig
from checkpointer.publish import copy_support_files, fsync_tree, output_config, replace_folder, staging_path, write_index
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
        checkpoint_dir: folder of the base model in Hugging Face format.
        output_dir: where checkpoints are written, as ``epoch_{N}`` / ``step_{N}`` folders.
        model_type: torchtune model type name (``LLAMA3_2``, ``QWEN2``, ...).
        checkpoint_files: weight files to read; default: the index, else ``model.safetensors``.
        max_shard_size: file size limit when the base has no weight map to follow.
        save_dtype: dtype of saved weights (default: the model's).
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
        process_group: dist.ProcessGroup | None = None,
        safe_serialization: bool = True,
        **unused: Any,
    ):
        if not safe_serialization:
            raise CheckpointError("safe_serialization=False is not supported: weights are only saved as safetensors")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = Path(output_dir)
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
    def source(self) -> Folder:
        return LocalFolder(self.checkpoint_dir)

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        return on_all_ranks(self._read_config, self.process_group).raw

    @cached_property
    def layout(self) -> Layout:
        return get_layout(self.model_type, ModelConfig.from_dict(self.config_dict))

    def _read_config(self) -> ModelConfig:
        if not self.source.exists(CONFIG_FILE):
            raise CheckpointError(f"{self.source.describe(CONFIG_FILE)}: missing; the model's dimensions come from it")
        text = self.source.read(CONFIG_FILE, 0, self.source.size(CONFIG_FILE))
        return ModelConfig.from_json(text, self.source.describe(CONFIG_FILE))

    def base_files(self) -> CheckpointFiles:
        """The base checkpoint's files and headers, read (and checked) on every rank."""
        return on_all_ranks(lambda: read_checkpoint_files(self.source, self.checkpoint_files), self.process_group)

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
        final = self.output_dir / name
        self.save_weights(state_dict[MODEL_KEY], final)
        if rank(self.process_group) == 0:
            log.info("saved checkpoint to %s", final)
        return str(final)

    def save_weights(self, model_state: dict[str, Any], final: Path) -> FileLayout:
        """Write ``model_state`` as a Hugging Face checkpoint folder ``final``."""
        specs, destinations, file_layout = on_all_ranks(lambda: self._plan_save(model_state), self.process_group)
        base_config = self.config_dict

        def publish(folder: Path) -> None:
            tied = not any(d.hf_key in self.layout.tied for d in destinations.values())
            dtypes = {s.dtype for s in specs.values()}
            copy_support_files(self.source, folder, output_config(base_config, dtypes.pop() if len(dtypes) == 1 else None, tied))
            write_index(folder, file_layout)
            fsync_tree(folder)
            replace_folder(folder, final)

        writer, started = SafetensorsWriter(staging_path(final), file_layout, publish), time.perf_counter()
        with _quiet_dcp(), dcp_errors(self.process_group), torch.no_grad():
            dcp.save(
                model_state,
                storage_writer=writer,
                planner=HFSavePlanner(self.layout, specs, destinations),
                process_group=self.process_group,
                no_dist=not is_distributed(),
            )
        self.last_save = IOStats(writer.bytes_written, time.perf_counter() - started, str(final))
        return file_layout

    def _plan_save(self, model_state: dict[str, Any]):
        model_specs = {key: global_spec(key, value) for key, value in model_state.items()}
        if self.save_dtype is not None:
            model_specs = {k: (self.save_dtype if dt.is_floating_point else dt, s) for k, (dt, s) in model_specs.items()}
        specs, destinations = plan_for_save(self.layout, model_specs)
        weight_map = self._base_weight_map()
        return specs, destinations, plan_file_layout(specs, weight_map, self.max_shard_size)

    def _base_weight_map(self) -> dict[str, str] | None:
        try:
            files = read_checkpoint_files(self.source, self.checkpoint_files)
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
