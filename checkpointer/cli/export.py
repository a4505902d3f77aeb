"""``checkpointer export``: an intermediate checkpoint as plain Hugging Face weights, with no process group.

- A checkpointer checkpoint holding only a LoRA adapter (PEFT format, plus training state):
  the adapter is merged into the base weights tensor by tensor.
- A DCP checkpoint of model weights (``dcp.save``'s ``FileSystemWriter`` format, any world
  size, e.g. torchtune's ``DistributedCheckpointer``): see :mod:`checkpointer.cli.dcp_export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpointer.cli.common import Checkpoint, ExportOptions, Outcome, Timer, base_location, dtypes_name, model_types, publish_built
from checkpointer.cli.dcp_export import DCP_METADATA_FILES, export_dcp, has_dcp
from checkpointer.cli.rewrite import rewrite, rewrite_layout
from checkpointer.errors import CheckpointArgumentError, CheckpointFormatError, CheckpointMismatchError, CheckpointNotFoundError
from checkpointer.format.hf_files import CheckpointFiles, read_checkpoint_files
from checkpointer.format.model_card import card_info, hub_repo_id
from checkpointer.format.peft import ADAPTER_CONFIG_FILE, ADAPTER_DIR, ADAPTER_FILE, lora_scale, merge_lora, peft_pairs
from checkpointer.format.tensor_io import read_tensor
from checkpointer.storage.factory import make_location


def export(checkpoint: str, options: ExportOptions) -> Outcome:
    """Write plain Hugging Face weights for the intermediate checkpoint at ``checkpoint``."""
    source = Checkpoint.open(checkpoint, "CHECKPOINT", options.storage_options)
    if source.has_weights:
        raise CheckpointArgumentError(
            f"{source.describe()} already holds Hugging Face weights (an adapter in {ADAPTER_DIR}/ beside them is already "
            f"merged in): to copy or re-split them use `checkpointer consolidate {checkpoint} --to DEST`",
            url=source.describe(),
        )
    if ADAPTER_FILE in source.files:
        return export_adapter(source, options)
    if has_dcp(source):
        return export_dcp(source, options)
    raise CheckpointNotFoundError(
        f"{source.describe()}: nothing to export: expected {ADAPTER_FILE} (a LoRA checkpoint) or DCP metadata "
        f"({' or '.join(DCP_METADATA_FILES)}); see what it holds with `checkpointer inspect {checkpoint}`",
        url=source.describe(),
    )


def export_adapter(source: Checkpoint, options: ExportOptions) -> Outcome:
    """Merge the adapter at ``source`` into its base's weights, tensor by tensor."""
    timer = Timer()
    config = source.read_json(ADAPTER_CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{source.describe(ADAPTER_CONFIG_FILE)}: missing or not a JSON object; PEFT adapters carry one", file=source.describe(ADAPTER_CONFIG_FILE))
    scale = lora_scale(config, source.describe(ADAPTER_CONFIG_FILE))
    base = Checkpoint.open(base_location(_base_name(source, config, options)), "--base", options.storage_options)
    adapter = read_checkpoint_files(source.folder, [ADAPTER_FILE])
    weights = base.weights()
    merge = _merger(adapter, weights, scale, source.describe(ADAPTER_FILE))
    file_layout = rewrite_layout(weights, options.dtype, options.max_shard_size)
    destination = make_location(options.to, "--to", options.storage_options, private=options.private)
    names = " / ".join(model_types(weights.tensors, base.config())) or None
    card = card_info(Path(source.describe()).name, hub_repo_id(base.location), names, dtypes_name(e.dtype for e in file_layout.entries.values()))
    build = lambda out: rewrite(base, weights, file_layout, out, f"export -> {options.to}", merge)  # noqa: E731
    message = options.message or f"checkpointer export: {source.describe()} merged into {base.describe()}"
    where = publish_built(destination, build, command="export", message=message, card=card, overwrite=options.overwrite)
    return Outcome(0, f"merged {len(merge.pairs)} LoRA pair(s) into {base.describe()}: {len(file_layout.headers)} file(s), {timer.rate(file_layout.total_bytes)} -> {where}")


def _base_name(source: Checkpoint, config: dict[str, Any], options: ExportOptions) -> str:
    name = options.base or config.get("base_model_name_or_path")
    if not name:
        raise CheckpointArgumentError(f"{source.describe(ADAPTER_CONFIG_FILE)} names no base model: pass --base with the base model's folder, URL or hf://ns/repo", file=source.describe(ADAPTER_CONFIG_FILE), key="--base")
    return str(name)


@dataclass(frozen=True)
class _Merger:
    """Adds ``scale * B A`` to each base weight an adapter targets (A and B read when their weight comes by)."""

    adapter: CheckpointFiles
    pairs: dict[str, tuple[str, str]]
    scale: float

    def __call__(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        if key not in self.pairs:
            return weight
        a, b = (read_tensor(self.adapter.folder, self.adapter.tensors[k]) for k in self.pairs[key])
        return merge_lora(weight, a, b, self.scale)


def _merger(adapter: CheckpointFiles, weights: CheckpointFiles, scale: float, where: str) -> _Merger:
    """Pair every adapter tensor with its base weight, checking the shapes line up before any data moves."""
    pairs = peft_pairs(adapter.tensors, where)
    problems = []
    for key, (a_key, b_key) in sorted(pairs.items()):
        weight, a, b = weights.tensors.get(key), adapter.tensors[a_key], adapter.tensors[b_key]
        if weight is None:
            problems.append(f"{a_key} adapts {key}, which the base does not have")
        elif len(weight.shape) != 2 or a.shape != (b.shape[-1], weight.shape[1]) or b.shape[0] != weight.shape[0]:
            problems.append(f"{key} {weight.shape} cannot take lora_A {a.shape} and lora_B {b.shape}")
    if problems:
        raise CheckpointMismatchError(f"{where} does not fit the base (is --base the model it was trained on?): " + "; ".join(problems[:5]), url=where)
    return _Merger(adapter, pairs, scale)
