"""Exporting a DCP checkpoint of model weights (torch's ``FileSystemWriter`` format) as Hugging Face weights.

Torchtune keys become Hugging Face keys (RoPE rows permuted back, Phi-3's q/k/v fused) with
the same layout code as a distributed save: each output file's tensors are loaded with DCP's
``no_dist`` load (resharding from whatever world size saved them) and written by the
library's DCP writer into that file alone, so memory holds one output file at a time.

DCP's default ``.metadata`` is a pickle; unpickling an untrusted file runs its code, so it
is read only when the user says ``--trust-pickle``. checkpointer's own ``.metadata.json``
is plain JSON and is always read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from checkpointer.cli.common import Checkpoint, ExportOptions, Outcome, Timer, base_location, dtypes_name, publish_built
from checkpointer.dcp.hf_io import WritePlan, quiet_dcp, write_hf_tensors
from checkpointer.dcp.training_state import METADATA_FILE, JsonMetadataReader, WeightsOnlyLoadPlanner
from checkpointer.errors import (
    CheckpointArgumentError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUnsupportedError,
)
from checkpointer.format.file_layout import layout_files
from checkpointer.format.hf_files import CONFIG_FILE
from checkpointer.format.hf_output import copy_support_files, write_index
from checkpointer.format.json_files import write_json
from checkpointer.format.model_card import card_info, hub_repo_id
from checkpointer.format.model_config import ModelConfig
from checkpointer.mapping.key_maps import KEY_MAPS, KeyMap, get_key_map, is_adapter_key
from checkpointer.mapping.local_shards import converted
from checkpointer.mapping.matching import match_for_save, saved_config
from checkpointer.phases import fetch_folder
from checkpointer.runtime.distributed import dcp_errors
from checkpointer.runtime.progress import byte_bar
from checkpointer.storage.factory import make_location

PICKLED_METADATA = ".metadata"  # DCP's default metadata file: a pickle
DCP_METADATA_FILES = (METADATA_FILE, PICKLED_METADATA)
MODEL_PREFIX = "model."  # torchtune's (and most trainers') state dicts nest the weights under "model"


def has_dcp(checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` holds DCP metadata (checkpointer's JSON or DCP's pickled default) at its top level."""
    return any(name in checkpoint.files for name in DCP_METADATA_FILES)


def dcp_reader(folder: Path, where: str, trust_pickle: bool) -> FileSystemReader:
    """A DCP reader for ``folder``: checkpointer's JSON metadata, or the pickled default only if trusted."""
    if (folder / METADATA_FILE).is_file():
        return JsonMetadataReader(folder)
    if not (folder / PICKLED_METADATA).is_file():
        raise CheckpointNotFoundError(f"{where}: no DCP metadata ({METADATA_FILE} or {PICKLED_METADATA}): is this a DCP checkpoint folder?", url=where)
    if not trust_pickle:
        raise CheckpointArgumentError(
            f"{where}/{PICKLED_METADATA}: DCP's default metadata is a Python pickle, and unpickling an untrusted file "
            "runs whatever code it holds. If you trust whoever wrote this checkpoint, rerun with --trust-pickle",
            file=f"{where}/{PICKLED_METADATA}", key="--trust-pickle",
        )
    return FileSystemReader(folder)


@dataclass(frozen=True)
class DcpModel:
    """The model weights in a DCP checkpoint: a reader, and the DCP key of each torchtune key."""

    reader: Callable[[], FileSystemReader]  # a fresh reader per load
    entries: dict[str, Any]  # DCP key -> its metadata
    keys: dict[str, str]  # torchtune key -> DCP key

    def spec(self, tune_key: str, dtype: torch.dtype | None) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self.entries[self.keys[tune_key]]
        return converted(dtype, entry.properties.dtype), tuple(entry.size)

    def load(self, tune_keys: list[str]) -> dict[str, torch.Tensor]:
        """Full tensors of ``tune_keys``, resharded from however many ranks saved them."""
        state = {self.keys[t]: torch.empty(tuple(self.entries[self.keys[t]].size), dtype=self.entries[self.keys[t]].properties.dtype) for t in tune_keys}
        with quiet_dcp(), dcp_errors():
            dcp.load(state, storage_reader=self.reader(), planner=WeightsOnlyLoadPlanner(), no_dist=True)
        return {t: state[self.keys[t]] for t in tune_keys}


def export_dcp(source: Checkpoint, options: ExportOptions) -> Outcome:
    """Write the model weights of the DCP checkpoint at ``source`` as Hugging Face files."""
    timer, where = Timer(), source.describe()
    config_source = _config_source(source, options)
    config = config_source.config()
    key_map = get_key_map(_model_type(options, where), ModelConfig.from_dict(config, config_source.describe(CONFIG_FILE)))
    model = _dcp_model(source, key_map, options.trust_pickle)
    specs, destinations = match_for_save(key_map, {t: model.spec(t, options.dtype) for t in model.keys})
    plan = WritePlan(key_map, specs, destinations, layout_files(specs, None, options.max_shard_size))

    def build(out: Path) -> None:
        with byte_bar(plan.file_layout.total_bytes, f"export -> {options.to}") as bar:
            for file in plan.file_layout.headers:  # one file at a time: memory holds that file's tensors
                one = plan.only(file)
                write_hf_tensors(model.load(list(one.destinations)), one, out, lambda _: None, None)
                bar.update(one.file_layout.total_bytes)
        write_json(out / CONFIG_FILE, saved_config(config, key_map, specs, destinations))
        copy_support_files(config_source.folder, out)
        write_index(out, plan.file_layout)

    destination = make_location(options.to, "--to", options.storage_options, private=options.private)
    card = card_info(Path(where).name, hub_repo_id(config_source.location), key_map.name, dtypes_name(s.dtype for s in specs.values()))
    message = options.message or f"checkpointer export: {where} as {key_map.name}"
    published = publish_built(destination, build, command="export", message=message, card=card, overwrite=options.overwrite)
    return Outcome(0, f"exported {len(model.keys)} tensors of {where} as {key_map.name}: {len(plan.file_layout.headers)} file(s), {timer.rate(plan.file_layout.total_bytes)} -> {published}")


def _dcp_model(source: Checkpoint, key_map: KeyMap, trust_pickle: bool) -> DcpModel:
    """Open the DCP checkpoint (remote folders are downloaded once: DCP reads local files)."""
    local = fetch_folder(source.location)
    reader = lambda: dcp_reader(local, source.describe(), trust_pickle)  # noqa: E731
    metadata = reader().read_metadata()
    return DcpModel(reader, metadata.state_dict_metadata, model_keys(metadata, key_map, source.describe()))


def _config_source(source: Checkpoint, options: ExportOptions) -> Checkpoint:
    """Where config.json (and the tokenizer) come from: --base, else the DCP folder itself."""
    if options.base:
        base = Checkpoint.open(base_location(options.base), "--base", options.storage_options)
        if CONFIG_FILE not in base.files:
            raise CheckpointNotFoundError(f"{base.describe()}: no {CONFIG_FILE}: --base must be a Hugging Face model folder or repo", url=base.describe(), key="--base")
        return base
    if CONFIG_FILE in source.files:
        return source
    raise CheckpointArgumentError(
        f"{source.describe()}: a DCP checkpoint has no {CONFIG_FILE}: pass --base with the base model "
        "(its config.json gives the dimensions; its tokenizer files are copied)",
        url=source.describe(), key="--base",
    )


def _model_type(options: ExportOptions, where: str) -> str:
    if not options.model_type:
        raise CheckpointArgumentError(f"{where}: DCP checkpoints hold torchtune keys: pass --model-type (one of {', '.join(sorted(KEY_MAPS))})", url=where, key="--model-type")
    return options.model_type


def model_keys(metadata: Metadata, key_map: KeyMap, where: str) -> dict[str, str]:
    """Torchtune key -> DCP key of every model weight: the ``model.*`` entries (torchtune's state), else all tensors."""
    tensors = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]
    nested = {k.removeprefix(MODEL_PREFIX): k for k in tensors if k.startswith(MODEL_PREFIX)}
    keys = nested if any(_known(key_map, k) for k in nested) else {k: k for k in tensors}
    adapter = sorted(k for k in keys if is_adapter_key(k))
    if adapter:
        raise CheckpointUnsupportedError(
            f"{where}: holds LoRA parameters ({adapter[0]}, ...): save merged weights, or the adapter with "
            "DistributedHFCheckpointer (then `checkpointer export` merges it)",
            url=where,
        )
    if not keys:
        raise CheckpointFormatError(f"{where}: the DCP checkpoint holds no tensors", url=where)
    return keys


def _known(key_map: KeyMap, key: str) -> bool:
    try:
        key_map.target(key)
    except CheckpointMismatchError:
        return False
    return True
