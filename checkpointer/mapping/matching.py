"""Matching a model's torchtune tensors with a checkpoint's Hugging Face tensors.

Every check runs on every rank over the whole key set (not only the local shards), so
all ranks reach the same verdict. Problems are collected and reported together, each
naming the key, the file and both shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from checkpointer.errors import CheckpointMismatchError
from checkpointer.format.hf_files import CONFIG_FILE
from checkpointer.format.safetensors import TensorEntry, TensorSpec
from checkpointer.mapping.key_maps import KEY_MAPS, KeyMap, hf_model_types_for, key_maps_for_hf_model_type

_MAX_LISTED = 12


@dataclass(frozen=True)
class Source:
    """Where to read a torchtune tensor: an HF tensor and the first HF row of its part."""

    entry: TensorEntry
    part_offset: int = 0


def _fail(problems: list[str], what: str) -> None:
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointMismatchError(f"{what}: {len(problems)} problem(s):\n  {listed}{more}")


def model_type_problems(key_map: KeyMap, where: str = "") -> list[str]:
    """A problem when config.json names an architecture that ``key_map`` would convert wrongly.

    Without this check a Llama checkpoint loads as QWEN2 with no error at all (same key
    names, no RoPE permutation), giving a model that silently computes garbage.
    """
    hf_type = key_map.config.model_type
    choices = key_maps_for_hf_model_type(hf_type)
    if not choices or key_map.name not in KEY_MAPS or hf_type in hf_model_types_for(key_map.name):
        return []  # a custom model_type, or one this key_map serves
    config = f"{where}/{CONFIG_FILE}" if where else f"the base model's {CONFIG_FILE}"
    listed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
    return [f"{config} has model_type {hf_type!r}, which is not a {key_map.name} model: pass model_type={listed}"]


def _part_offsets(parts: tuple[str, ...], rows: dict[str, int]) -> dict[str, int]:
    offsets, position = {}, 0
    for part in parts:
        offsets[part] = position
        position += rows[part]
    return offsets


def match_for_load(
    key_map: KeyMap, model_shapes: dict[str, tuple[int, ...]], tensors: dict[str, TensorEntry], where: str
) -> dict[str, Source]:
    """For each model key, the checkpoint tensor to read; raises on any mismatch.

    ``model_shapes`` holds global shapes of the model's tensors; ``tensors`` the
    checkpoint's; ``where`` names the checkpoint in messages.
    """
    problems: list[str] = model_type_problems(key_map, where)
    sources: dict[str, Source] = {}
    used: set[str] = set()
    for key, shape in model_shapes.items():
        try:
            target = key_map.target(key)
        except CheckpointMismatchError as e:
            problems.append(str(e))
            continue
        hf_key = target.hf_key
        if hf_key not in tensors and key_map.tied.get(hf_key) in tensors and key_map.config.tie_word_embeddings:
            hf_key = key_map.tied[hf_key]
        entry = tensors.get(hf_key)
        if entry is None:
            problems.append(f"missing key: {key} (stored as {target.hf_key}) is not in {where}")
            continue
        used.add(hf_key)
        missing_parts = [p for p in target.parts if p not in model_shapes]
        if missing_parts:
            problems.append(f"{entry.file}: {hf_key} also holds {missing_parts}, which the model lacks")
            continue
        head_dim = key_map.config.head_dim
        if target.rule.rope and (not shape or shape[0] % head_dim):
            problems.append(f"{key}: shape {tuple(shape)} is not whole heads of head_dim {head_dim} (config.json)")
            continue
        offsets = _part_offsets(target.parts, {p: model_shapes[p][0] if model_shapes[p] else 1 for p in target.parts})
        expected = _fused_shape([model_shapes[p] for p in target.parts])
        if expected != entry.shape:
            problems.append(
                f"shape mismatch: {key} has shape {tuple(shape)} in the model but {hf_key} in "
                f"{entry.file} has {entry.shape}"
                + (f" (parts {list(target.parts)})" if len(target.parts) > 1 else "")
            )
            continue
        sources[key] = Source(entry, offsets[key])
    for hf_key, entry in tensors.items():
        if hf_key in used or key_map.is_ignored(hf_key) or _is_spare_tied_copy(key_map, hf_key, tensors):
            continue
        known = key_map.tune_keys(hf_key)
        why = f"the model has no {known}" if known else f"{key_map.name} does not use it"
        problems.append(f"unexpected key: {hf_key} in {entry.file} ({why})")
    _fail(problems, f"the checkpoint at {where} does not match the {key_map.name} model")
    return sources


def _is_spare_tied_copy(key_map: KeyMap, hf_key: str, tensors: dict[str, TensorEntry]) -> bool:
    """lm_head.weight in a tied model's file is a copy of the embedding the model does not need."""
    return hf_key in key_map.tied and key_map.tied[hf_key] in tensors and (
        key_map.config.tie_word_embeddings or key_map.tune_keys(hf_key) is None
    )


def _fused_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if len(shapes) == 1:
        return tuple(shapes[0])
    tails = {tuple(s[1:]) for s in shapes}
    if len(tails) != 1:
        return (-1,)
    return (sum(s[0] for s in shapes), *tails.pop())


@dataclass(frozen=True)
class Destination:
    """Where a torchtune tensor is written: an HF tensor and the first HF row of its part."""

    hf_key: str
    part_offset: int = 0


def plan_for_save(
    key_map: KeyMap, model_specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
) -> tuple[dict[str, TensorSpec], dict[str, Destination]]:
    """The HF tensors to write (dtype, global shape) and where each model tensor goes."""
    problems: list[str] = model_type_problems(key_map)
    specs: dict[str, TensorSpec] = {}
    destinations: dict[str, Destination] = {}
    for key in model_specs:
        try:
            target = key_map.target(key)
        except CheckpointMismatchError as e:
            problems.append(str(e))
            continue
        missing = [p for p in target.parts if p not in model_specs]
        if missing:
            problems.append(f"{key} is stored fused in {target.hf_key} with {missing}, which the state dict lacks")
            continue
        parts = [model_specs[p] for p in target.parts]
        if len({dtype for dtype, _ in parts}) != 1:
            problems.append(f"the parts of {target.hf_key} ({list(target.parts)}) have different dtypes")
            continue
        shape = _fused_shape([s for _, s in parts])
        if shape == (-1,):
            problems.append(f"the parts of {target.hf_key} ({list(target.parts)}) have incompatible shapes")
            continue
        specs[target.hf_key] = TensorSpec(target.hf_key, parts[0][0], shape)
        offsets = _part_offsets(target.parts, {p: model_specs[p][1][0] for p in target.parts})
        destinations[key] = Destination(target.hf_key, offsets[key])
    _fail(problems, f"the state dict cannot be saved as {key_map.name}")
    return specs, destinations


def model_specs_from_checkpoint(
    key_map: KeyMap, tensors: dict[str, TensorEntry], where: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The torchtune tensors (dtype, shape) a checkpoint holds, for loading without a model."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    problems: list[str] = model_type_problems(key_map, where)
    for hf_key, entry in tensors.items():
        keys = key_map.tune_keys(hf_key)
        if keys is None:
            if not (key_map.is_ignored(hf_key) or _is_spare_tied_copy(key_map, hf_key, tensors)):
                problems.append(f"unexpected key: {hf_key} in {entry.file} ({key_map.name} does not use it)")
            continue
        if hf_key in key_map.tied and key_map.config.tie_word_embeddings:
            continue
        rows = [key_map.part_rows(k) or entry.shape[0] for k in keys]
        if sum(rows) != entry.shape[0]:
            problems.append(
                f"shape mismatch: {hf_key} in {entry.file} has {entry.shape[0]} rows but the config's "
                f"dimensions give {rows} for {keys}"
            )
            continue
        for key, n in zip(keys, rows):
            specs[key] = (entry.dtype, (n, *entry.shape[1:]))
    _fail(problems, f"the checkpoint at {where} does not match {key_map.name}")
    return specs
