"""DistributedHFCheckpointer: torchtune's checkpointer interface over DCP and HF safetensors.

Loading reads, on every rank, only the bytes of that rank's shards; saving writes, on
every rank, only that rank's bytes, straight into the final Hugging Face files. The same
code runs with one process (no process group) and with many.

This class is a facade: the base checkpoint is :mod:`checkpointer.base_checkpoint`,
resuming :mod:`checkpointer.resume`, loading :mod:`checkpointer.load`, saving :mod:`checkpointer.save` and
:mod:`checkpointer.async_save`; every collective step is in :mod:`checkpointer.phases`.
Every method that runs collectives says so; attributes never do.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from checkpointer import phases
from checkpointer.async_save import AsyncSave
from checkpointer.base_checkpoint import BaseCheckpoint
from checkpointer.dcp.hf_io import IOStats, check_materialized
from checkpointer.dcp.routing import Traffic
from checkpointer.errors import CheckpointArgumentError, CheckpointError, CheckpointMismatchError, CheckpointUnsupportedError
from checkpointer.format.dtypes import parse_dtype
from checkpointer.format.folder import Folder
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.load import Loader
from checkpointer.mapping.key_maps import KeyMap, adapter_state_dict, is_adapter_key
from checkpointer.resume import ResumePoint, published_checkpoints
from checkpointer.runtime.distributed import alone, is_distributed, rank, world_size
from checkpointer.save import ADAPTER_KEY, MODEL_KEY, Saver, SaveRequest, SaveResult, is_sharded
from checkpointer.storage.factory import checkpoint_file_names, make_location
from checkpointer.storage.local import LocalLocation
from checkpointer.storage.output_lock import OutputLock

log = logging.getLogger(__name__)


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

    Every rank constructs it and calls its methods in the same order. The first collective
    method opens it (see :meth:`open`); call ``open()`` yourself to read ``config_dict``,
    ``key_map``, ``resuming`` or ``resume_manifest`` before loading: they are plain
    attributes, answered without communication, and raise until the checkpointer is open.

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
        self.checkpoint_files = checkpoint_file_names(checkpoint_files, self.source)
        self.resume_from_checkpoint = resume_from_checkpoint
        self.should_load_recipe_state = should_load_recipe_state
        self.keep_last_n_checkpoints = keep_last_n_checkpoints
        self.max_shard_size = max_shard_size
        self.save_dtype = parse_dtype(save_dtype, "save_dtype")
        self.streaming = streaming
        self.verify_checksums = verify_checksums
        self.process_group = process_group
        self.async_save = async_save
        self._lock = OutputLock(self.destination.path) if isinstance(self.destination, LocalLocation) else None
        self._lock_checked = False
        self._async: AsyncSave[SaveResult] = AsyncSave()
        self._base: BaseCheckpoint | None = None
        self._resume: ResumePoint | None = None
        self._saver: Saver | None = None
        self.training_info: dict[str, Any] = {}  # recipes add details for the model card
        self.last_load: IOStats | None = None
        self.last_save: IOStats | None = None
        self.last_network = Traffic()  # bytes this rank sent / received over the process group in the last save
        if unused:
            log.debug("ignoring torchtune checkpointer arguments %s", sorted(unused))
        register_with_torchtune(type(self))

    # ---- opening: the first collective phase --------------------------------------------------

    def open(self) -> DistributedHFCheckpointer:
        """Open the base checkpoint and find the checkpoint to resume from (collective; once; returns self).

        Every rank must call it (the loading and saving methods do, on first use). Afterwards
        ``source_folder``, ``config_dict``, ``key_map``, ``resuming`` and ``resume_manifest``
        answer on any rank without communication.
        """
        if self._base is None:
            base = BaseCheckpoint.open(self.source, self.model_type, self.checkpoint_files, streaming=self.streaming, group=self.process_group)
            self._resume = ResumePoint.find(self.destination, self.process_group) if self.resume_from_checkpoint else None
            self._base = base
        return self

    @property
    def base(self) -> BaseCheckpoint:
        """The opened base checkpoint (after :meth:`open`)."""
        if self._base is None:
            raise CheckpointError("DistributedHFCheckpointer: not open yet: call open() on every rank first (it is collective)")
        return self._base

    @property
    def resume_point(self) -> ResumePoint | None:
        """The checkpoint being resumed from, or None (after :meth:`open`)."""
        self.base  # noqa: B018 - raises until open
        return self._resume

    @property
    def source_folder(self) -> Folder:
        return self.base.folder

    @property
    def config_dict(self) -> dict[str, Any]:
        return self.base.config

    @property
    def key_map(self) -> KeyMap:
        return self.base.key_map

    @property
    def resume_manifest(self) -> dict[str, Any] | None:
        """The manifest of the checkpoint to resume from (None when not resuming or none exists)."""
        return self.resume_point.manifest if self.resume_point else None

    @property
    def resuming(self) -> bool:
        return self.resume_point is not None

    def local_support_dir(self) -> Path:
        """A local folder with the base's config, tokenizer and generation files (collective)."""
        return self.open().base.support_dir(self.process_group)

    def published_checkpoints(self) -> list[dict[str, Any]]:
        """The manifests of the complete checkpoints in ``output_dir``, oldest first (one process)."""
        return published_checkpoints(self.destination)

    # ---- loading -----------------------------------------------------------------------------

    def _loader(self) -> Loader:
        """The loading steps of this job (opens the checkpointer first: collective the first time)."""
        self.open()
        return Loader(self.base, self.resume_point, self.process_group, self.streaming, self.verify_checksums)

    def base_files(self) -> CheckpointFiles:
        """The base checkpoint's files and headers, read on every rank and checked against its manifest (collective)."""
        return self._loader().base_files()

    def load_checkpoint(self) -> dict[str, Any]:
        """torchtune's interface: full state dicts with torchtune keys, on every rank (collective).

        ``{"model": ...}`` of the base; when resuming, the same weights ``load_model`` takes
        (the resumed checkpoint's, or the base under a LoRA adapter), ``"adapter"`` when the
        checkpoint has one, and the recipe state under torchtune's keys (``optimizer``,
        ``seed``, ``epochs_run``, ``total_epochs``, ``max_steps_per_epoch``, ...) with the
        optimizer state in the form ``load_from_full_optimizer_state_dict`` takes.
        """
        loader = self._loader()
        contents = loader.contents
        checkpoint = {MODEL_KEY: loader.read_whole(*loader.weight_files(adapter=contents.adapter is not None), self.key_map)}
        self.last_load = loader.last
        if contents.adapter is not None:
            checkpoint[ADAPTER_KEY] = loader.read_whole(*loader.adapter_files(loader.resumed_adapter()), loader.adapter_key_map())
        if contents.training_state and self.should_load_recipe_state is not False:
            checkpoint.update(loader.resume.whole_training_state(self.process_group))
        return checkpoint

    def load_model(self, model: nn.Module) -> None:
        """Load weights in place into ``model`` (plain, or sharded with FSDP2) (collective).

        The base weights come from ``checkpoint_dir``, or from the resumed checkpoint when it
        holds full weights. LoRA parameters come from the resumed checkpoint's adapter, or
        keep their initialization.
        """
        state_dict = model.state_dict(keep_vars=True)  # the parameters themselves: no detached copy of each to make
        if self._base is None:  # before a first open downloads the base; later, the read itself checks
            phases.check(lambda: check_materialized(state_dict), self.process_group)
        loader = self._loader()
        self._hold_output_lock(self.process_group)
        base = {k: v for k, v in state_dict.items() if not is_adapter_key(k)}
        adapter = {k: v for k, v in state_dict.items() if is_adapter_key(k)}
        loader.read(base, loader.weight_files(adapter=bool(adapter))[0], self.key_map)
        self.last_load = loader.last
        if adapter and loader.contents.adapter is not None:
            loader.read(adapter, loader.adapter_files(loader.resumed_adapter())[0], loader.adapter_key_map())

    def load_adapter(self, model: nn.Module, location: str | Path) -> None:
        """Load a PEFT adapter (``adapter_model.safetensors``) at ``location`` into ``model``'s LoRA parameters (collective)."""
        adapter = adapter_state_dict(model)
        if not adapter:
            raise CheckpointMismatchError(f"load_adapter: the model has no LoRA parameters to load {location} into", url=str(location))
        loader = self._loader()
        loader.read(adapter, loader.adapter_files(make_location(location, "location"))[0], loader.adapter_key_map())

    def load_training_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fill ``state`` in place from the resumed checkpoint's training state (collective).

        Top-level entries the checkpoint does not hold (e.g. another rank count's RNG
        states) are dropped from ``state``; returns ``state``.
        """
        resume = self.open().resume_point
        if resume is None:
            raise CheckpointError("load_training_state: not resuming (resume_from_checkpoint is off or nothing to resume)")
        return resume.load_training_state(state, self.process_group)

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
        Every rank calls it (collective); each writes only its own bytes. Full (unsharded)
        tensors on rank 0 only, as torchtune's LoRA recipe hands them, are saved by rank 0
        alone, entering no collective; another rank's call returns at once.

        With ``async_save`` (default: the constructor's), the call returns once this rank's
        shards are copied into reusable buffers; writing and publishing continue in the
        background on a separate process group. A second save waits for the first; an error
        of a background save is raised by the next save or by :meth:`wait`.
        """
        self.wait()
        request = SaveRequest(epoch, step, intermediate_checkpoint, adapter_only, dict(self.training_info))
        url = self.destination.checkpoint(request.name).url
        if is_distributed(self.process_group) and world_size(self.process_group) > 1 and not is_sharded(state_dict):
            if rank(self.process_group) == 0:
                with alone():
                    self._record(self._saver_for_this_job().save(state_dict, request, None))
            return url
        saver = self._saver_for_this_job()
        if self.async_save if async_save is None else async_save:
            self._async.start(lambda staged, group: saver.save(staged, request, group), state_dict)
            return url
        self._record(saver.save(state_dict, request, self.process_group))
        return url

    def wait(self) -> None:
        """Block until a background save is published; raise its error if it failed (on every rank)."""
        result = self._async.wait()
        if result is not None:
            self._record(result)

    @property
    def last_blocked_seconds(self) -> float | None:
        """How long the last asynchronous save held the caller (copying the shards into buffers)."""
        return self._async.last_blocked_seconds

    def _record(self, result: SaveResult) -> None:
        self.last_save = result.stats or self.last_save
        self.last_network = result.traffic

    def _saver_for_this_job(self) -> Saver:
        if self._saver is None:
            model_type = getattr(self.model_type, "name", self.model_type)
            self._saver = Saver(
                self.open().base, self.destination, model_type, self.save_dtype, self.max_shard_size, self.keep_last_n_checkpoints, self._hold_output_lock
            )
        return self._saver

    def _hold_output_lock(self, group: dist.ProcessGroup | None) -> None:
        """Refuse a second job writing the same local output folder (held until this process exits; collective)."""
        if self._lock is not None and not self._lock_checked:  # the same answer on every rank
            phases.decide(self._lock.acquire, group)
            self._lock_checked = True


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
