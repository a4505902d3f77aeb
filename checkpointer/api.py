"""DistributedHFCheckpointer: torchtune's checkpointer interface over DCP and HF safetensors.

Loading reads, on every rank, only the bytes of that rank's shards; saving writes, on
every rank, only that rank's bytes, straight into the final Hugging Face files. The same
code runs with one process (no process group) and with many.

A checkpoint ``epoch_N`` / ``step_N`` is assembled in a staging folder: Hugging Face
weights (``model*.safetensors``), a LoRA adapter in PEFT's format, and, for intermediate
checkpoints, the resumable training state (``training_state/``, DCP's sharded format);
then ``checkpointer.json`` is written and the folder is published in one step.
"""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import logging
import shutil
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from checkpointer.dcp.hf_io import IOStats, read_hf_tensors, write_hf_tensors
from checkpointer.dcp.node_staging import NodeStaging
from checkpointer.dcp.recipe_state import OPT_KEY, name_optimizer_params, read_whole_training_state
from checkpointer.dcp.routing import Channel, Traffic
from checkpointer.dcp.staging import StagingBuffers
from checkpointer.dcp.training_state import TRAINING_STATE_DIR, JsonMetadataReader, load_training_state, save_training_state, stored_keys
from checkpointer.errors import (
    CheckpointArgumentError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUnsupportedError,
)
from checkpointer.format.digests import Digests, read_back_digests
from checkpointer.format.dtypes import parse_dtype
from checkpointer.format.file_layout import empty_file_layout, plan_file_layout
from checkpointer.format.folder import Folder, LocalFolder
from checkpointer.format.hf_files import CONFIG_FILE, CheckpointFiles, read_checkpoint_files
from checkpointer.format.hf_output import copy_support_files, write_index
from checkpointer.format.json_files import write_json
from checkpointer.format.manifest import MANIFEST_FILE, check_against_manifest, files_of, parse_manifest, read_manifest
from checkpointer.format.model_card import card_info, hub_repo_id
from checkpointer.format.model_config import ModelConfig
from checkpointer.format.peft import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_FILE, peft_adapter_config
from checkpointer.mapping.key_maps import KeyMap, adapter_key_map, adapter_state_dict, get_key_map, is_adapter_key
from checkpointer.mapping.local_shards import converted, global_spec
from checkpointer.mapping.matching import model_specs_from_checkpoint, plan_for_save, saved_config
from checkpointer.phases import hash_files, verify_hashes
from checkpointer.runtime.distributed import alone, is_distributed, local_rank, on_all_ranks, on_rank_zero, rank, world_size
from checkpointer.runtime.failpoints import failpoint
from checkpointer.runtime.nodes import Nodes
from checkpointer.runtime.progress import human_size
from checkpointer.storage.factory import make_location
from checkpointer.storage.local import LocalLocation
from checkpointer.storage.location import Location, cache_root, fresh_dir, url_key
from checkpointer.storage.output_lock import OutputLock
from checkpointer.storage.publish import seal

log = logging.getLogger(__name__)

# torchtune.training's state-dict keys
MODEL_KEY = "model"
ADAPTER_KEY = "adapter"
ADAPTER_CONFIG_KEY = "adapter_config"

def checkpoint_name(epoch: int, step: int | None = None) -> str:
    return f"step_{step}" if step is not None else f"epoch_{epoch}"


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
        resume_from_checkpoint: continue from the newest checkpoint in ``output_dir`` that has
            training state (``load_model`` and ``load_training_state`` read from it).
        keep_last_n_checkpoints: after each save, remove older checkpoints beyond this many.
        max_shard_size: file size limit when the base has no weight map to follow.
        save_dtype: dtype of saved weights (default: the model's).
        streaming: read remote weights by byte range, each rank only its own shards, instead
            of downloading the files once per node first.
        verify_checksums: before loading a checkpoint that has a manifest, check the digests of
            every file (xxh3 ranges, or an older manifest's sha256; each byte hashed once, split
            across ranks, whatever number of ranks saved it). Sizes are always checked.
        async_save: save in the background by default (see ``save_checkpoint``); call
            ``wait()`` before the process ends.
        storage_options: fsspec options for URL locations (e.g. an S3 ``endpoint_url``).
        hub_private: create a missing Hub output repo as private (default True).
        process_group: the group whose ranks share the model (default: the world).
        should_load_recipe_state: torchtune's flag: whether ``load_checkpoint()`` returns the
            recipe state when resuming (default: yes).

    It counts as a ``torchtune.training.checkpointing.DistributedCheckpointer`` (a virtual
    subclass, registered once torchtune is imported), so torchtune's ``CheckpointClient`` calls
    ``save_checkpoint`` on every rank with sharded state dicts.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        output_dir: str | Path,
        model_type: Any,
        checkpoint_files: Sequence[str] | dict | None = None,
        *,
        resume_from_checkpoint: bool = False,
        keep_last_n_checkpoints: int | None = None,
        max_shard_size: int | str = "5GB",
        save_dtype: str | torch.dtype | None = None,
        streaming: bool = False,
        verify_checksums: bool = False,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        hub_private: bool = True,
        process_group: dist.ProcessGroup | None = None,
        safe_serialization: bool = True,
        should_load_recipe_state: bool | None = None,
        **unused: Any,
    ):
        if not safe_serialization:
            raise CheckpointUnsupportedError("safe_serialization=False is not supported: weights are only saved as safetensors", key="safe_serialization")
        if keep_last_n_checkpoints is not None and int(keep_last_n_checkpoints) < 1:
            raise CheckpointArgumentError(f"keep_last_n_checkpoints={keep_last_n_checkpoints}: must be at least 1", key="keep_last_n_checkpoints")
        options = dict(storage_options or {})
        self.source = make_location(checkpoint_dir, "checkpoint_dir", options)
        self.destination = make_location(output_dir, "output_dir", options, private=hub_private)
        self.model_type = model_type
        self.checkpoint_files = _file_list(checkpoint_files, self.source)
        self.resume_from_checkpoint = resume_from_checkpoint
        self.should_load_recipe_state = should_load_recipe_state
        self.keep_last_n_checkpoints = keep_last_n_checkpoints
        self.max_shard_size = max_shard_size
        self.save_dtype = parse_dtype(save_dtype, "save_dtype")
        self.streaming = streaming
        self.verify_checksums = verify_checksums
        self.process_group = process_group
        self._lock = OutputLock(self.destination.path) if isinstance(self.destination, LocalLocation) else None
        self._lock_checked = False
        self.async_save = async_save
        self.last_blocked_seconds: float | None = None
        self._staging = StagingBuffers()
        self._pending: concurrent.futures.Future | None = None
        self._background: DistributedHFCheckpointer | None = None
        self._executor: concurrent.futures.Executor | None = None
        self.training_info: dict[str, Any] = {}  # recipes add details for the model card
        self.last_load: IOStats | None = None
        self.last_save: IOStats | None = None
        self._staging_nodes: dict[str, Nodes] = {}  # staging parent -> which ranks share it (probed at the first save)
        self._save_count = itertools.count()
        self.last_network = Traffic()  # bytes this rank sent / received over the process group in the last save
        if unused:
            log.debug("ignoring torchtune checkpointer arguments %s", sorted(unused))
        register_with_torchtune(type(self))

    # ---- the base checkpoint -----------------------------------------------------------------

    @cached_property
    def source_folder(self) -> Folder:
        """The base checkpoint's files (collective: remote sources are fetched or opened here)."""
        return self.source.open(self.process_group, self.streaming, self.checkpoint_files)

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        folder = self.source_folder
        return on_all_ranks(lambda: _read_config(folder), self.process_group).raw

    @cached_property
    def key_map(self) -> KeyMap:
        return get_key_map(self.model_type, ModelConfig.from_dict(self.config_dict))

    def local_support_dir(self) -> Path:
        """A local folder with the base's config, tokenizer and generation files (collective)."""
        folder = self.source_folder
        if isinstance(folder, LocalFolder):
            return folder.root
        target = cache_root() / "support" / url_key(self.source.describe())

        def copy() -> None:
            target.mkdir(parents=True, exist_ok=True)
            copy_support_files(folder, target)
            (target / CONFIG_FILE).write_bytes(folder.read(CONFIG_FILE, 0, folder.size(CONFIG_FILE)))

        on_all_ranks(lambda: copy() if local_rank(self.process_group) == 0 else None, self.process_group)
        return target

    def _files(self, folder: Folder, checkpoint_files: Sequence[str] | None) -> CheckpointFiles:
        """Read and check a checkpoint's files (and, with a manifest, their sizes or hashes) on every rank."""
        return self._checked_files(folder, lambda: read_checkpoint_files(folder, checkpoint_files))

    def _checked_files(self, folder: Folder, read_files: Callable[[], CheckpointFiles]) -> CheckpointFiles:
        """``read_files()`` on every rank, checked against ``folder``'s manifest (sizes, or hashes when verifying)."""
        def read() -> tuple[CheckpointFiles, dict[str, Any] | None]:
            files, manifest = read_files(), read_manifest(folder)
            if manifest is not None:
                check_against_manifest(folder, manifest, list(files.files))
            return files, manifest

        files, manifest = on_all_ranks(read, self.process_group)  # one collective for all the checks
        if manifest is not None and self.verify_checksums:
            verify_hashes(folder, manifest, list(files.files), self.process_group)
        return files

    @cached_property
    def _base_headers(self) -> CheckpointFiles:
        """The base checkpoint's files and headers as this rank read them (once: loads and saves share them)."""
        return read_checkpoint_files(self.source_folder, self.checkpoint_files)

    def base_files(self) -> CheckpointFiles:
        """The base checkpoint's files and headers, read (and checked) on every rank."""
        return self._checked_files(self.source_folder, lambda: self._base_headers)

    # ---- resuming ----------------------------------------------------------------------------

    @cached_property
    def resume_manifest(self) -> dict[str, Any] | None:
        """The manifest of the checkpoint to resume from (None when not resuming or none exists)."""
        if not self.resume_from_checkpoint:
            return None
        manifest = on_rank_zero(self._newest_resumable, self.process_group)
        if manifest is None and rank(self.process_group) == 0:
            log.warning("resume_from_checkpoint: no checkpoint with training state in %s; starting fresh", self.destination.describe())
        return manifest

    def published_checkpoints(self) -> list[dict[str, Any]]:
        """The manifests of the complete checkpoints in ``output_dir``, oldest first (one process)."""
        manifests = []
        for name in self.destination.checkpoint_names():
            text = self.destination.checkpoint(name).read_file(MANIFEST_FILE)
            if text:
                manifests.append(parse_manifest(text, self.destination.describe(name)) | {"name": name})
        return sorted(manifests, key=lambda m: (m.get("created_ns", 0), m["name"]))

    def _newest_resumable(self) -> dict[str, Any] | None:
        resumable = [m for m in self.published_checkpoints() if m["contents"].get("training_state")]
        return resumable[-1] if resumable else None

    @property
    def resuming(self) -> bool:
        return self.resume_manifest is not None

    @cached_property
    def resume_location(self) -> Location | None:
        return self.destination.checkpoint(self.resume_manifest["name"]) if self.resume_manifest else None

    @cached_property
    def _resume_folder(self) -> Folder:
        return self.resume_location.open(self.process_group, self.streaming, None)

    # ---- loading -----------------------------------------------------------------------------

    def load_checkpoint(self) -> dict[str, Any]:
        """torchtune's interface: full state dicts with torchtune keys, on every rank.

        ``{"model": ...}`` of the base; when resuming, the same weights ``load_model`` takes
        (the resumed checkpoint's, or the base under a LoRA adapter), ``"adapter"`` when the
        checkpoint has one, and the recipe state under torchtune's keys (``optimizer``,
        ``seed``, ``epochs_run``, ``total_epochs``, ``max_steps_per_epoch``, ...) with the
        optimizer state in the form ``load_from_full_optimizer_state_dict`` takes.
        """
        contents = self.resume_manifest["contents"] if self.resuming else {}
        if contents.get("weights") and contents.get("adapter") is None:
            files, where = self._files(self._resume_folder, None), self.resume_location.describe()
        else:
            files, where = self.base_files(), self.source.describe()
        checkpoint = {MODEL_KEY: self._read_whole(files, self.key_map, where)}
        if contents.get("adapter") is not None:
            location = self.resume_location.subfolder(contents["adapter"])
            folder = location.open(self.process_group, self.streaming, [ADAPTER_FILE])
            checkpoint[ADAPTER_KEY] = self._read_whole(self._files(folder, [ADAPTER_FILE]), adapter_key_map(self.key_map), location.describe())
        if contents.get("training_state") and self.should_load_recipe_state is not False:
            checkpoint.update(self._whole_training_state())
        return checkpoint

    def _read_whole(self, files: CheckpointFiles, key_map: KeyMap, where: str) -> dict[str, torch.Tensor]:
        """Every tensor of ``files`` in full, with torchtune keys (collective)."""
        specs = on_all_ranks(lambda: model_specs_from_checkpoint(key_map, files.tensors, where), self.process_group)
        state_dict = {key: torch.empty(shape, dtype=dtype) for key, (dtype, shape) in specs.items()}
        self.last_load = read_hf_tensors(state_dict, files, key_map, self.process_group)
        return state_dict

    def _whole_training_state(self) -> dict[str, Any]:
        """The resumed training state with full tensors, read by every rank on its own (collective around it)."""
        folder = self.resume_location.fetch_folder(TRAINING_STATE_DIR, self.process_group)
        return on_all_ranks(lambda: read_whole_training_state(JsonMetadataReader(folder)), self.process_group)

    def load_model(self, model: nn.Module) -> None:
        """Load weights in place into ``model`` (plain, or sharded with FSDP2).

        The base weights come from ``checkpoint_dir``, or from the resumed checkpoint when it
        holds full weights. LoRA parameters come from the resumed checkpoint's adapter, or
        keep their initialization.
        """
        state_dict = model.state_dict()
        on_all_ranks(lambda: _check_materialized(state_dict), self.process_group)
        self._hold_output_lock()
        base = {k: v for k, v in state_dict.items() if not is_adapter_key(k)}
        adapter = {k: v for k, v in state_dict.items() if is_adapter_key(k)}
        contents = self.resume_manifest["contents"] if self.resuming else {}
        if contents.get("weights") and not adapter:  # full fine-tuning resumes from its own weights
            files = self._files(self._resume_folder, None)
        else:  # LoRA keeps the original base; merged weights in a checkpoint already hold the adapter
            files = self.base_files()
        self.last_load = read_hf_tensors(base, files, self.key_map, self.process_group)
        if adapter and contents.get("adapter") is not None:
            folder = self.resume_location.subfolder(contents["adapter"]).open(self.process_group, self.streaming, [ADAPTER_FILE])
            self._read_adapter(adapter, folder)

    def load_adapter(self, model: nn.Module, location: str | Path) -> None:
        """Load a PEFT adapter (``adapter_model.safetensors``) at ``location`` into ``model``'s LoRA parameters."""
        adapter = adapter_state_dict(model)
        if not adapter:
            raise CheckpointMismatchError(f"load_adapter: the model has no LoRA parameters to load {location} into", url=str(location))
        folder = make_location(location, "location").open(self.process_group, self.streaming, [ADAPTER_FILE])
        self._read_adapter(adapter, folder)

    def _read_adapter(self, adapter: dict[str, Any], folder: Folder) -> None:
        read_hf_tensors(adapter, self._files(folder, [ADAPTER_FILE]), adapter_key_map(self.key_map), self.process_group)

    def load_training_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fill ``state`` in place from the resumed checkpoint's training state (collective).

        Top-level entries the checkpoint does not hold (e.g. another rank count's RNG
        states) are dropped from ``state``; returns ``state``.
        """
        if not self.resuming:
            raise CheckpointError("load_training_state: not resuming (resume_from_checkpoint is off or nothing to resume)")
        reader = JsonMetadataReader(self.resume_location.fetch_folder(TRAINING_STATE_DIR, self.process_group))
        stored = on_all_ranks(lambda: stored_keys(reader), self.process_group)
        for key in [k for k in state if not any(s == k or s.startswith(f"{k}.") for s in stored)]:
            del state[key]
        load_training_state(state, reader, self.process_group)
        return state

    # ---- saving ------------------------------------------------------------------------------

    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
        *,
        step: int | None = None,
        async_save: bool | None = None,
    ) -> str:
        """torchtune's interface; returns where the checkpoint is (or, when async, will be) published.

        ``state_dict`` holds ``"model"`` (weights; skipped when ``adapter_only``), optionally
        ``"adapter"`` (LoRA parameters) with ``"adapter_config"`` (``r``, ``lora_alpha``),
        and, when ``intermediate_checkpoint``, anything else as resumable training state.
        The adapter (PEFT format) is at the checkpoint's top level, or in ``adapter/`` when
        merged weights are saved beside it.
        Every rank calls it; each writes only its own bytes.

        With ``async_save`` (default: the constructor's), the call returns once this rank's
        shards are copied into reusable buffers; writing and publishing continue in the
        background on a separate process group. A second save waits for the first; an error
        of a background save is raised by the next save or by :meth:`wait`.
        """
        self.wait()
        if is_distributed(self.process_group) and world_size(self.process_group) > 1 and not _is_sharded(state_dict):
            return self._save_alone(state_dict, epoch, intermediate_checkpoint, adapter_only, step)
        if self.async_save if async_save is None else async_save:
            return self._save_in_background(state_dict, epoch, intermediate_checkpoint, adapter_only, step)
        return self._save(state_dict, epoch, intermediate_checkpoint, adapter_only, step)

    def _save_alone(self, state_dict: dict[str, Any], epoch: int, intermediate: bool, adapter_only: bool, step: int | None) -> str:
        """Full (unsharded) tensors, as torchtune's LoRA recipe hands them on rank 0 only: rank 0 saves
        them by itself, entering no collective; another rank's call returns at once."""
        if rank(self.process_group) != 0:
            return self.destination.describe(checkpoint_name(epoch, step))
        with alone():
            return self._save(state_dict, epoch, intermediate, adapter_only, step)

    def wait(self) -> None:
        """Block until a background save is published; raise its error if it failed (on every rank)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
            self.last_save = self._background.last_save

    def _save_in_background(self, state_dict: dict[str, Any], epoch: int, intermediate: bool, adapter_only: bool, step: int | None) -> str:
        started = time.perf_counter()
        staged = self._staging.stage(state_dict)
        self.last_blocked_seconds = time.perf_counter() - started
        background = self._background_checkpointer()
        self._pending = self._executor.submit(background._save, staged, epoch, intermediate, adapter_only, step)
        return self.destination.describe(checkpoint_name(epoch, step))

    def _background_checkpointer(self) -> DistributedHFCheckpointer:
        """A copy of this checkpointer whose collectives use a process group of its own (created once)."""
        if self._background is None:
            group = dist.new_group(backend="gloo") if is_distributed() else None  # collective: every rank is here
            self._background = copy.copy(self)
            self._background.process_group = group
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpointer-save")
        return self._background

    def _save(self, state_dict: dict[str, Any], epoch: int, intermediate_checkpoint: bool, adapter_only: bool, step: int | None) -> str:
        started = time.perf_counter()
        name = checkpoint_name(epoch, step)
        staging = self.destination.staging_dir(name)
        weights = state_dict.get(MODEL_KEY) if not adapter_only else None
        adapter = state_dict.get(ADAPTER_KEY)
        training = {k: v for k, v in state_dict.items() if k not in (MODEL_KEY, ADAPTER_KEY, ADAPTER_CONFIG_KEY)}
        if isinstance(training.get(OPT_KEY), dict) and _is_sharded(state_dict) and MODEL_KEY in state_dict:
            training[OPT_KEY] = name_optimizer_params(training[OPT_KEY], state_dict[MODEL_KEY])
        if adapter_only and adapter is None:  # torchtune's error and text
            raise CheckpointArgumentError(
                "Adapter checkpoint not found in state_dict. Please ensure that the state_dict contains adapter weights.",
                key=ADAPTER_KEY,
            )
        if weights is None and adapter is None:
            raise CheckpointArgumentError(f"save_checkpoint: nothing to save: no {MODEL_KEY!r} or {ADAPTER_KEY!r} in {sorted(state_dict)}", key="state_dict")
        folder = self.source_folder
        weights_plan = on_all_ranks(lambda: self._plan_weights(weights), self.process_group) if weights is not None else None
        adapter_plan = on_all_ranks(lambda: self._plan_adapter(adapter, state_dict), self.process_group) if adapter is not None else None
        # An adapter beside merged weights goes to adapter/: transformers would apply it twice otherwise.
        adapter_dir = ADAPTER_DIR if weights is not None else ""
        self._hold_output_lock()
        on_rank_zero(lambda: fresh_dir(staging), self.process_group)
        spread = NodeStaging.of(staging, self.process_group, self._staging_nodes)  # several nodes: rank 0's assembles
        hashes: Digests = {}  # hashed while written (complete on rank 0), then the rest read back
        with spread.watching(f"save of {self.destination.describe(name)}", f"{url_key(str(staging))}-{next(self._save_count)}"):
            try:
                if weights is not None:
                    self.last_save, hashes = self._write_weights(weights, weights_plan, staging, name, spread.channel)
                if adapter is not None:
                    hashes |= _prefixed(adapter_dir, self._write_adapter(adapter, adapter_plan, staging / adapter_dir, spread.channel))
                if intermediate_checkpoint:  # every rank wrote some of it: every rank (of rank 0's node) hashes some of it
                    save_training_state(training, staging / TRAINING_STATE_DIR, self.process_group)
                    spread.gather(staging / TRAINING_STATE_DIR)
                    training_files = _prefixed(TRAINING_STATE_DIR, spread.listing(staging / TRAINING_STATE_DIR))
                    hashes |= hash_files(LocalFolder(staging), training_files, self.process_group, spread.nodes.home)
            except BaseException:
                if rank(self.process_group) == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            finally:
                spread.remove_local_copies()
                self.last_network = spread.traffic
            contents = {"weights": weights is not None, "adapter": adapter_dir if adapter is not None else None, "training_state": intermediate_checkpoint}
            info = {"name": name, "epoch": epoch, "step": step, "contents": contents, "world_size": world_size(self.process_group)}
            card = self._card(name, weights)
            size = on_rank_zero(lambda: self._complete_and_publish(staging, folder, name, info, card, hashes), self.process_group)
        failpoint("save:after_publish")
        published = self.destination.describe(name)
        if rank(self.process_group) == 0:
            seconds = time.perf_counter() - started
            log.info("saved %s: %s in %.1f s (%.2f GB/s) to %s", name, human_size(size), seconds, size / 1e9 / max(seconds, 1e-9), published)
        if self.keep_last_n_checkpoints:
            on_rank_zero(lambda: self._prune(keep=name), self.process_group)
        return published

    def _plan_weights(self, model_state: dict[str, Any]):
        model_specs = {key: global_spec(key, value) for key, value in model_state.items()}
        if self.save_dtype is not None:
            model_specs = {k: (converted(self.save_dtype, dt), s) for k, (dt, s) in model_specs.items()}
        specs, destinations = plan_for_save(self.key_map, model_specs, self._base_weight_map or ())
        return specs, destinations, plan_file_layout(specs, self._base_weight_map, self.max_shard_size)

    def _write_weights(self, model_state: dict[str, Any], plan, staging: Path, name: str, channel: Channel | None) -> tuple[IOStats, Digests]:
        specs, destinations, file_layout = plan
        config = saved_config(self.config_dict, self.key_map, specs, destinations)

        def finish(folder: Path) -> None:
            write_json(folder / CONFIG_FILE, config)
            write_index(folder, file_layout)

        stats, digests = write_hf_tensors(model_state, self.key_map, specs, destinations, file_layout, staging, finish, self.process_group, channel=channel)
        return IOStats(stats.bytes, stats.seconds, self.destination.describe(name)), digests

    def _plan_adapter(self, adapter_state: dict[str, Any], state_dict: dict[str, Any]):
        key_map = adapter_key_map(self.key_map)
        specs, destinations = plan_for_save(key_map, {k: global_spec(k, v) for k, v in adapter_state.items()})
        file_layout = plan_file_layout(specs, {k: ADAPTER_FILE for k in specs}) if specs else empty_file_layout(ADAPTER_FILE)
        adapter_config = state_dict.get(ADAPTER_CONFIG_KEY) or {}
        ranks = {s.shape[0] for k, s in specs.items() if k.endswith("lora_A.weight")}
        if not specs and adapter_config.get("r") is None:  # an empty adapter: the file, and no config to describe it
            return key_map, specs, destinations, file_layout, None
        ranks = ranks or {int(adapter_config["r"])}
        alpha = adapter_config.get("lora_alpha")
        if len(ranks) != 1 or alpha is None:
            raise CheckpointArgumentError(
                f"save_checkpoint: an adapter needs one LoRA rank (found {sorted(ranks)}) and "
                f"state_dict[{ADAPTER_CONFIG_KEY!r}]['lora_alpha']",
                key=ADAPTER_CONFIG_KEY,
            )
        config = peft_adapter_config(sorted(specs), ranks.pop(), alpha, self._base_model_id())
        return key_map, specs, destinations, file_layout, config

    def _write_adapter(self, adapter_state: dict[str, Any], plan, staging: Path, channel: Channel | None) -> Digests:
        key_map, specs, destinations, file_layout, config = plan
        finish = lambda folder: config is not None and write_json(folder / ADAPTER_CONFIG_FILE, config)  # noqa: E731
        return write_hf_tensors(adapter_state, key_map, specs, destinations, file_layout, staging, finish, self.process_group, channel=channel)[1]

    def _complete_and_publish(self, staging: Path, source: Folder, name: str, info: dict, card: dict, hashes: Digests) -> int:
        """Rank 0, in one step: the support files, digests of the files nobody hashed yet, the manifest, publish; the bytes saved.

        The files rank 0 adds itself (config, index, tokenizer) are small; they are read back once.
        """
        try:
            copy_support_files(source, staging)
            sizes = files_of(staging)
            failpoint("save:hash")
            hashes = hashes | read_back_digests(LocalFolder(staging), {n: s for n, s in sizes.items() if n not in hashes})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._publish(staging, name, info, card, sizes, hashes)
        return sum(sizes.values())

    def _publish(self, staging: Path, name: str, info: dict, card: dict, sizes: dict[str, int], hashes: Digests) -> None:
        seal(staging, info, sizes, hashes)
        failpoint("save:publish")
        self.destination.publish(staging, name, card)

    def _hold_output_lock(self) -> None:
        """Refuse a second job writing the same local output folder (held until this process exits)."""
        if self._lock is not None and not self._lock_checked:  # the same answer on every rank
            on_rank_zero(self._lock.acquire, self.process_group)
            self._lock_checked = True

    def _prune(self, keep: str) -> None:
        """Remove the oldest checkpoints beyond ``keep_last_n_checkpoints``; never ``keep``, the one just saved.

        ``keep`` counts as the newest whatever the other manifests' clocks say.
        """
        names = [m["name"] for m in self.published_checkpoints() if m["name"] != keep]
        for name in names[: max(0, len(names) + 1 - int(self.keep_last_n_checkpoints))]:
            log.info("removing old checkpoint %s", self.destination.describe(name))
            self.destination.remove(name)

    def _base_model_id(self) -> str:
        return hub_repo_id(self.source) or self.source.describe()

    def _card(self, name: str, weights: dict[str, Any] | None) -> dict[str, Any]:
        dtypes = {v.dtype for v in (weights or {}).values() if isinstance(v, torch.Tensor)}
        dtype = self.save_dtype or (dtypes.pop() if len(dtypes) == 1 else None)
        dtype_name = str(dtype).removeprefix("torch.") if dtype else "adapter only" if weights is None else "mixed"
        card = card_info(name, hub_repo_id(self.source), getattr(self.model_type, "name", self.model_type), dtype_name, world_size(self.process_group))
        return card | {"training": dict(self.training_info)}

    @cached_property
    def _base_weight_map(self) -> dict[str, str] | None:
        """The base's tensor -> file map (read once), which saves follow; None if it cannot be read.

        A base of one file without an index has no split to follow: ``max_shard_size`` decides.
        """
        try:
            files = self._base_headers
        except CheckpointError:
            return None
        if files.weight_map is None and len(files.files) == 1:
            return None
        return {key: entry.file for key, entry in files.tensors.items()}


def _prefixed(folder: str, by_name: dict[str, Any]) -> dict[str, Any]:
    """``by_name`` with its keys as paths inside subfolder ``folder`` of the checkpoint ("" for its top level)."""
    return {f"{folder}/{name}" if folder else name: value for name, value in by_name.items()}


def _file_list(checkpoint_files: Sequence[str | Path] | dict | None, source: Location) -> list[str] | None:
    """torchtune allows a list of names (``str`` or ``Path``, relative to ``checkpoint_dir`` or absolute
    inside it) or a dict with ``filename_format`` and ``max_filename``."""
    if isinstance(checkpoint_files, dict) or hasattr(checkpoint_files, "keys"):  # also omegaconf DictConfig
        if not {"filename_format", "max_filename"} <= set(checkpoint_files):
            raise CheckpointArgumentError(f"checkpoint_files {dict(checkpoint_files)!r}: expected filename_format and max_filename", key="checkpoint_files")
        count = int(checkpoint_files["max_filename"])
        return [checkpoint_files["filename_format"].format(str(i).zfill(5), str(count).zfill(5)) for i in range(1, count + 1)]
    if checkpoint_files is None or isinstance(checkpoint_files, (str, Path)) or not hasattr(checkpoint_files, "__iter__"):
        if checkpoint_files is None:
            return None
        raise CheckpointArgumentError(f"checkpoint_files {checkpoint_files!r}: expected a list of file names", key="checkpoint_files")
    return [_relative_file(f, source) for f in checkpoint_files] or None


def _relative_file(name: str | Path, source: Location) -> str:
    """A checkpoint file name relative to ``checkpoint_dir`` (an absolute path must lie inside a local one)."""
    path = Path(name)
    if not path.is_absolute():
        return path.as_posix()
    root = source.path.resolve() if isinstance(source, LocalLocation) else None
    if root is None or not path.resolve().is_relative_to(root):
        raise CheckpointArgumentError(f"checkpoint_files: {name} is not inside checkpoint_dir {source.describe()}", key="checkpoint_files")
    return path.resolve().relative_to(root).as_posix()


_MAX_CONFIG_BYTES = 16 * 2**20  # real configs are a few KB


def _read_config(folder: Folder) -> ModelConfig:
    if not folder.exists(CONFIG_FILE):
        raise CheckpointNotFoundError(f"{folder.describe(CONFIG_FILE)}: missing; the model's dimensions come from it", file=folder.describe(CONFIG_FILE))
    size = folder.size(CONFIG_FILE)
    if size > _MAX_CONFIG_BYTES:
        raise CheckpointFormatError(f"{folder.describe(CONFIG_FILE)}: {size} bytes is too large for a config.json", file=folder.describe(CONFIG_FILE))
    return ModelConfig.from_json(folder.read(CONFIG_FILE, 0, size), folder.describe(CONFIG_FILE))


def _is_sharded(state_dict: dict[str, Any]) -> bool:
    """Whether the weights handed to a save are DTensors (every rank holds a part and calls)."""
    tensors = [*(state_dict.get(MODEL_KEY) or {}).values(), *(state_dict.get(ADAPTER_KEY) or {}).values()]
    return any(isinstance(t, DTensor) for t in tensors)


def register_with_torchtune(cls: type) -> None:
    """Make ``cls`` a virtual subclass of torchtune's ``DistributedCheckpointer`` once torchtune is imported.

    torchtune's ``CheckpointClient`` asks ``isinstance(checkpointer, DistributedCheckpointer)`` to
    decide whether every rank saves its shards or rank 0 saves a gathered copy; the class is a
    ``typing.Protocol`` (an ABC), so ``register`` answers it without importing torchtune here.
    """
    module = sys.modules.get("torchtune.training.checkpointing._checkpointer")
    base = getattr(module, "DistributedCheckpointer", None)
    if base is not None and not issubclass(cls, base):
        base.register(cls)


def _check_materialized(state_dict: dict[str, Any]) -> None:
    meta = [key for key, value in state_dict.items() if isinstance(value, torch.Tensor) and value.is_meta]
    if meta:
        raise CheckpointArgumentError(
            f"{len(meta)} model tensors are on the meta device (e.g. {meta[0]}): call model.to_empty(device=...) first",
            key=meta[0],
        )


