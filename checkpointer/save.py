"""Saving one checkpoint: plan it on every rank, write each rank's bytes into the staging folder, seal, publish.

A checkpoint ``epoch_N`` / ``step_N`` is assembled in a staging folder: Hugging Face
weights (``model*.safetensors``), a LoRA adapter in PEFT's format, and, for intermediate
checkpoints, the resumable training state (``training_state/``, DCP's sharded format);
then ``checkpointer.json`` is written and the folder is published in one step.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from checkpointer import phases
from checkpointer.base_checkpoint import BaseCheckpoint
from checkpointer.dcp.hf_io import IOStats, WritePlan
from checkpointer.dcp.node_staging import NodeStaging
from checkpointer.dcp.recipe_state import OPT_KEY, name_optimizer_params
from checkpointer.dcp.routing import Channel, Traffic
from checkpointer.errors import CheckpointArgumentError
from checkpointer.format.digests import Digests, read_back_digests
from checkpointer.format.file_layout import empty_file_layout, layout_files
from checkpointer.format.folder import LocalFolder, fresh_dir
from checkpointer.format.hf_files import CONFIG_FILE
from checkpointer.format.hf_output import copy_support_files, write_index
from checkpointer.format.json_files import write_json
from checkpointer.format.manifest import TRAINING_STATE_DIR, Contents, files_of
from checkpointer.format.model_card import card_info, hub_repo_id
from checkpointer.format.peft import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_FILE, peft_adapter_config
from checkpointer.mapping.key_maps import adapter_key_map
from checkpointer.mapping.local_shards import converted, global_spec
from checkpointer.mapping.matching import match_for_save, saved_config
from checkpointer.resume import prune
from checkpointer.runtime.cache import url_key
from checkpointer.runtime.distributed import rank, world_size
from checkpointer.runtime.failpoints import failpoint
from checkpointer.runtime.nodes import Nodes
from checkpointer.runtime.progress import human_size
from checkpointer.storage.location import Location, PublishOptions
from checkpointer.storage.publish import seal

log = logging.getLogger(__name__)

# torchtune.training's state-dict keys
MODEL_KEY = "model"
ADAPTER_KEY = "adapter"
ADAPTER_CONFIG_KEY = "adapter_config"


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    return f"step_{step}" if step is not None else f"epoch_{epoch}"


def is_sharded(state_dict: dict[str, Any]) -> bool:
    """Whether the weights handed to a save are DTensors (every rank holds a part and calls)."""
    tensors = [*(state_dict.get(MODEL_KEY) or {}).values(), *(state_dict.get(ADAPTER_KEY) or {}).values()]
    return any(isinstance(t, DTensor) for t in tensors)


@dataclass(frozen=True)
class SaveRequest:
    """One ``save_checkpoint`` call."""

    epoch: int
    step: int | None
    intermediate: bool
    adapter_only: bool
    training_info: dict[str, Any]

    @property
    def name(self) -> str:
        return checkpoint_name(self.epoch, self.step)


@dataclass(frozen=True)
class SaveResult:
    """What writing a checkpoint's weights took, and what crossed the network."""

    stats: IOStats | None
    traffic: Traffic


@dataclass
class Saver:
    """Writes checkpoints of a model loaded from ``base`` to ``destination``."""

    base: BaseCheckpoint
    destination: Location
    model_type_name: str
    save_dtype: torch.dtype | None
    max_shard_size: int | str
    keep_last_n_checkpoints: int | None
    hold_output_lock: Callable[[dist.ProcessGroup | None], None]
    staging_nodes: dict[str, Nodes] = field(default_factory=dict)  # staging parent -> which ranks share it (probed at the first save)
    _count: itertools.count = field(default_factory=itertools.count)
    _last_weights_plan: tuple[list[Any], WritePlan] | None = None  # (the model's specs, their plan): later saves reuse it

    def save(self, state_dict: dict[str, Any], request: SaveRequest, group: dist.ProcessGroup | None) -> SaveResult:
        """Write, seal and publish one checkpoint (collective)."""
        started, name = time.perf_counter(), request.name
        published = self.destination.checkpoint(name).url
        weights, adapter, training = _split(state_dict, request.adapter_only)
        weights_plan = phases.plan(lambda: self._plan_weights(weights), group) if weights is not None else None
        adapter_plan = phases.plan(lambda: self._plan_adapter(adapter, state_dict), group) if adapter is not None else None
        adapter_dir = ADAPTER_DIR if weights is not None else ""  # beside merged weights transformers would apply it twice
        self.hold_output_lock(group)
        staging = self.destination.staging_dir(name)
        phases.act(lambda: fresh_dir(staging), group)
        spread = phases.node_staging(staging, group, self.staging_nodes)  # several nodes: rank 0's assembles
        stats, hashes = None, {}  # hashed while written (complete on rank 0), then the rest read back
        with spread.watching(f"save of {published}", f"{url_key(str(staging))}-{next(self._count)}"):
            try:
                if weights is not None:
                    stats, hashes = self._write_weights(weights, weights_plan, staging, published, group, spread.channel)
                if adapter is not None:
                    hashes |= _prefixed(adapter_dir, self._write_adapter(adapter, adapter_plan, staging / adapter_dir, group, spread.channel))
                if request.intermediate:
                    hashes |= self._write_training_state(training, staging, group, spread)
            except BaseException:
                if rank(group) == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            finally:
                spread.remove_local_copies()
            contents = Contents(weights is not None, adapter_dir if adapter is not None else None, request.intermediate)
            info = {"name": name, "epoch": request.epoch, "step": request.step, "contents": contents.as_json(), "world_size": world_size(group)}
            card = self._card(name, weights, request.training_info, group)
            size = phases.publish(lambda: self._complete_and_publish(staging, name, info, card, hashes), group)
        failpoint("save:after_publish")
        if rank(group) == 0:
            seconds = time.perf_counter() - started
            log.info("saved %s: %s in %.1f s (%.2f GB/s) to %s", name, human_size(size), seconds, size / 1e9 / max(seconds, 1e-9), published)
        if self.keep_last_n_checkpoints:
            phases.act(lambda: prune(self.destination, keep=name, keep_last=int(self.keep_last_n_checkpoints)), group)
        return SaveResult(stats, spread.traffic)

    def _plan_weights(self, model_state: dict[str, Any]) -> WritePlan:
        model_specs = {key: global_spec(key, value) for key, value in model_state.items()}
        if self.save_dtype is not None:
            model_specs = {k: (converted(self.save_dtype, dt), s) for k, (dt, s) in model_specs.items()}
        if self._last_weights_plan is not None and self._last_weights_plan[0] == list(model_specs.items()):
            return self._last_weights_plan[1]  # the same keys (in order), dtypes and shapes as the last save: the same files
        weight_map = self.base.weight_map
        specs, destinations = match_for_save(self.base.key_map, model_specs, weight_map or ())
        plan = WritePlan(self.base.key_map, specs, destinations, layout_files(specs, weight_map, self.max_shard_size))
        self._last_weights_plan = (list(model_specs.items()), plan)
        return plan

    def _write_weights(self, model_state, plan: WritePlan, staging: Path, url: str, group, channel: Channel | None) -> tuple[IOStats, Digests]:
        config = saved_config(self.base.config, plan.key_map, plan.specs, plan.destinations)

        def finish(folder: Path) -> None:
            write_json(folder / CONFIG_FILE, config)
            write_index(folder, plan.file_layout)

        stats, digests = phases.write(model_state, plan, staging, finish, group, channel=channel)
        return IOStats(stats.bytes, stats.seconds, url), digests

    def _plan_adapter(self, adapter_state: dict[str, Any], state_dict: dict[str, Any]) -> tuple[WritePlan, dict[str, Any] | None]:
        """The adapter's plan and its PEFT config (None for an empty adapter: the file, and no config to describe it)."""
        key_map = adapter_key_map(self.base.key_map)
        specs, destinations = match_for_save(key_map, {k: global_spec(k, v) for k, v in adapter_state.items()})
        file_layout = layout_files(specs, {k: ADAPTER_FILE for k in specs}) if specs else empty_file_layout(ADAPTER_FILE)
        plan = WritePlan(key_map, specs, destinations, file_layout)
        adapter_config = state_dict.get(ADAPTER_CONFIG_KEY) or {}
        if not specs and adapter_config.get("r") is None:
            return plan, None
        ranks = {s.shape[0] for k, s in specs.items() if k.endswith("lora_A.weight")} or {int(adapter_config["r"])}
        alpha = adapter_config.get("lora_alpha")
        if len(ranks) != 1 or alpha is None:
            raise CheckpointArgumentError(
                f"save_checkpoint: an adapter needs one LoRA rank (found {sorted(ranks)}) and "
                f"state_dict[{ADAPTER_CONFIG_KEY!r}]['lora_alpha']",
                key=ADAPTER_CONFIG_KEY,
            )
        return plan, peft_adapter_config(sorted(specs), ranks.pop(), alpha, self.base_model_id())

    def _write_adapter(self, adapter_state, planned: tuple[WritePlan, dict[str, Any] | None], staging: Path, group, channel: Channel | None) -> Digests:
        plan, config = planned
        finish = lambda folder: config is not None and write_json(folder / ADAPTER_CONFIG_FILE, config)  # noqa: E731
        return phases.write(adapter_state, plan, staging, finish, group, channel=channel)[1]

    def _write_training_state(self, training: dict[str, Any], staging: Path, group, spread: NodeStaging) -> Digests:
        """Every rank writes some of it, and every rank of rank 0's node hashes some of it."""
        phases.write_training_state(training, staging / TRAINING_STATE_DIR, group)
        spread.gather(staging / TRAINING_STATE_DIR)
        training_files = _prefixed(TRAINING_STATE_DIR, spread.listing(staging / TRAINING_STATE_DIR))
        with LocalFolder(staging) as folder:
            return phases.hash_files(folder, training_files, group, spread.nodes.home)

    def _complete_and_publish(self, staging: Path, name: str, info: dict, card: dict, hashes: Digests) -> int:
        """Rank 0, in one step: the support files, digests of the files nobody hashed yet, the manifest, publish; the bytes saved.

        The files rank 0 adds itself (config, index, tokenizer) are small; they are read back once.
        """
        try:
            copy_support_files(self.base.folder, staging)
            sizes = files_of(staging)
            failpoint("save:hash")
            with LocalFolder(staging) as folder:
                hashes = hashes | read_back_digests(folder, {n: s for n, s in sizes.items() if n not in hashes})
            seal(staging, info, sizes, hashes)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        failpoint("save:publish")
        self.destination.publish(staging, name, options=PublishOptions(card=card))
        return sum(sizes.values())

    def base_model_id(self) -> str:
        return hub_repo_id(self.base.location) or self.base.location.url

    def _card(self, name: str, weights: dict[str, Any] | None, training_info: dict[str, Any], group) -> dict[str, Any]:
        dtypes = {v.dtype for v in (weights or {}).values() if isinstance(v, torch.Tensor)}
        dtype = self.save_dtype or (dtypes.pop() if len(dtypes) == 1 else None)
        dtype_name = str(dtype).removeprefix("torch.") if dtype else "adapter only" if weights is None else "mixed"
        card = card_info(name, hub_repo_id(self.base.location), self.model_type_name, dtype_name, world_size(group))
        return card | {"training": dict(training_info)}


def _split(state_dict: dict[str, Any], adapter_only: bool) -> tuple[dict | None, dict | None, dict[str, Any]]:
    """The weights, the adapter and the rest (training state) of what ``save_checkpoint`` was handed."""
    weights = state_dict.get(MODEL_KEY) if not adapter_only else None
    adapter = state_dict.get(ADAPTER_KEY)
    training = {k: v for k, v in state_dict.items() if k not in (MODEL_KEY, ADAPTER_KEY, ADAPTER_CONFIG_KEY)}
    if isinstance(training.get(OPT_KEY), dict) and is_sharded(state_dict) and MODEL_KEY in state_dict:
        training[OPT_KEY] = name_optimizer_params(training[OPT_KEY], state_dict[MODEL_KEY])
    if adapter_only and adapter is None:  # torchtune's error and text
        raise CheckpointArgumentError(
            "Adapter checkpoint not found in state_dict. Please ensure that the state_dict contains adapter weights.", key=ADAPTER_KEY
        )
    if weights is None and adapter is None:
        raise CheckpointArgumentError(f"save_checkpoint: nothing to save: no {MODEL_KEY!r} or {ADAPTER_KEY!r} in {sorted(state_dict)}", key="state_dict")
    return weights, adapter, training


def _prefixed(folder: str, by_name: dict[str, Any]) -> dict[str, Any]:
    """``by_name`` with its keys as paths inside subfolder ``folder`` of the checkpoint ("" for its top level)."""
    return {f"{folder}/{name}" if folder else name: value for name, value in by_name.items()}
