"""Matching a model's torchtune tensors with a checkpoint's Hugging Face tensors.

Every check runs on every rank over the whole key set (not only the local shards), so
all ranks reach the same verdict. Problems are collected and reported together, each
naming the key, the file and both shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from checkpointer.errors import CheckpointMismatchError
from checkpointer.format.hf_files import CONFIG_FILE
from checkpointer.format.hf_output import output_config
from checkpointer.format.safetensors import TensorEntry, TensorSpec
from checkpointer.mapping.key_maps import (
    KEY_MAPS,
    PER_EXPERT,
    KeyMap,
    Target,
    hf_model_types_for,
    key_maps_for_hf_model_type,
    stored_keys,
)
from checkpointer.mapping.pieces import Placement

_MAX_LISTED = 12


Specs = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # torchtune key -> (dtype, shape)


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


def _part_rows(target: Target, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Rows of each part along the dimension they are joined on (1 if a part has no such dim)."""
    dim = target.rule.part_dim
    return {p: shapes[p][dim] if len(shapes[p]) > dim else 1 for p in target.parts}


def _hf_shape(target: Target, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of the HF tensor (of each expert's, for a per-expert rule) that ``target`` 's parts make."""
    parts = [tuple(shapes[p]) for p in target.parts]
    if not target.rule.experts:
        return _fused_shape(parts)
    if len({s[:1] for s in parts}) != 1:
        return (-1,)
    per_expert = _fused_shape([s[1:] for s in parts])
    return per_expert if target.rule.experts == PER_EXPERT else (*parts[0][:1], *per_expert)


def _experts(target: Target, shape: tuple[int, ...]) -> int:
    """The expert count of a tensor of ``target`` 's rule (its dim 0), 0 for other rules."""
    return shape[0] if target.rule.experts and shape else 0


def _part_offsets(parts: tuple[str, ...], rows: dict[str, int]) -> dict[str, int]:
    offsets, position = {}, 0
    for part in parts:
        offsets[part] = position
        position += rows[part]
    return offsets


def match_for_load(
    key_map: KeyMap, model_shapes: dict[str, tuple[int, ...]], tensors: dict[str, TensorEntry], where: str
) -> dict[str, Placement]:
    """For each model key, the checkpoint tensor to read; raises on any mismatch.

    ``model_shapes`` holds global shapes of the model's tensors; ``tensors`` the
    checkpoint's; ``where`` names the checkpoint in messages.
    """
    key_map = key_map.for_hf_keys(tensors)
    problems: list[str] = model_type_problems(key_map, where)
    sources: dict[str, Placement] = {}
    used: set[str] = set()
    for key, shape in model_shapes.items():
        try:
            target = key_map.target(key)
        except CheckpointMismatchError as e:
            problems.append(str(e))
            continue
        missing_parts = [p for p in target.parts if p not in model_shapes]
        if missing_parts:
            problems.append(f"{target.hf_key} also holds {missing_parts}, which the model lacks")
            continue
        head_dim = key_map.config.head_dim
        if target.rule.rope and (not shape or shape[0] % head_dim):
            problems.append(f"{key}: shape {tuple(shape)} is not whole heads of head_dim {head_dim} (config.json)")
            continue
        found, ok = _matched_keys(key_map, key, target, model_shapes, tensors, where, problems)
        used.update(found)
        if ok:
            offsets = _part_offsets(target.parts, _part_rows(target, model_shapes))
            sources[key] = Placement(found[0] if len(found) == 1 else target.hf_key, target.rule, offsets[key], _experts(target, shape))
    for hf_key, entry in tensors.items():
        if hf_key in used or key_map.is_ignored(hf_key) or _is_spare_tied_copy(key_map, hf_key, tensors):
            continue
        known = key_map.tune_keys(hf_key)
        why = f"the model has no {known}" if known else f"{key_map.name} does not use it"
        if known and known[0] in model_shapes:
            why = f"the model's {known[0]} has {model_shapes[known[0]][0]} experts (num_experts in config.json)"
        problems.append(f"unexpected key: {hf_key} in {entry.file} ({why})")
    _fail(problems, f"the checkpoint at {where} does not match the {key_map.name} model")
    return sources


def _matched_keys(
    key_map: KeyMap,
    key: str,
    target: Target,
    model_shapes: dict[str, tuple[int, ...]],
    tensors: dict[str, TensorEntry],
    where: str,
    problems: list[str],
) -> tuple[list[str], bool]:
    """The HF keys in the file that hold ``key`` (one per expert for a per-expert rule), and whether all match."""
    shape = model_shapes[key]
    expected = _hf_shape(target, model_shapes)
    experts = f" (the model has {shape[0]} experts: num_experts in config.json)" if target.rule.experts else ""
    found, bad = [], []
    for stored in stored_keys(target.hf_key, target.rule, _experts(target, shape)):
        hf_key = stored
        if hf_key not in tensors and key_map.tied.get(hf_key) in tensors and key_map.config.tie_word_embeddings:
            hf_key = key_map.tied[hf_key]
        entry = tensors.get(hf_key)
        if entry is None:
            bad.append(f"missing key: {key} (stored as {stored}) is not in {where}{experts}")
        elif expected != entry.shape:
            parts = f" (parts {list(target.parts)})" if len(target.parts) > 1 else ""
            bad.append(
                f"shape mismatch: {key} has shape {tuple(shape)} in the model but {hf_key} in "
                f"{entry.file} has {entry.shape}{parts}{experts}"
            )
        if entry is not None:
            found.append(hf_key)
    problems += bad
    return found, not bad


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


def match_for_save(
    key_map: KeyMap, model_specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], base_keys: Iterable[str] = ()
) -> tuple[dict[str, TensorSpec], dict[str, Placement]]:
    """The HF tensors to write (dtype, global shape) and where each model tensor goes.

    ``base_keys``: the HF keys of the base checkpoint, whose layout (per-expert or fused
    experts) the save keeps.
    """
    key_map = key_map.for_hf_keys(base_keys)
    problems: list[str] = model_type_problems(key_map)
    specs: dict[str, TensorSpec] = {}
    destinations: dict[str, Placement] = {}
    shapes = {key: shape for key, (_, shape) in model_specs.items()}
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
        dtypes = {model_specs[p][0] for p in target.parts}
        if len(dtypes) != 1:
            problems.append(f"the parts of {target.hf_key} ({list(target.parts)}) have different dtypes")
            continue
        shape = _hf_shape(target, shapes)
        if shape == (-1,):
            problems.append(f"the parts of {target.hf_key} ({list(target.parts)}) have incompatible shapes")
            continue
        offsets = _part_offsets(target.parts, _part_rows(target, shapes))
        destinations[key] = Placement(target.hf_key, target.rule, offsets[key], _experts(target, shapes[key]))
        for hf_key in destinations[key].hf_keys:
            specs[hf_key] = TensorSpec(hf_key, next(iter(dtypes)), shape)
    _fail(problems, f"the state dict cannot be saved as {key_map.name}")
    return specs, destinations


def model_specs_from_checkpoint(
    key_map: KeyMap, tensors: dict[str, TensorEntry], where: str
) -> Specs:
    """The torchtune tensors (dtype, shape) a checkpoint holds, for loading without a model."""
    key_map = key_map.for_hf_keys(tensors)
    specs: Specs = {}
    experts: dict[str, int] = {}  # per-expert tune key -> the number of experts seen
    problems: list[str] = model_type_problems(key_map, where)
    for hf_key, entry in tensors.items():
        keys = key_map.tune_keys(hf_key)
        if keys is None:
            if not (key_map.is_ignored(hf_key) or _is_spare_tied_copy(key_map, hf_key, tensors)):
                problems.append(f"unexpected key: {hf_key} in {entry.file} ({key_map.name} does not use it)")
            continue
        if hf_key in key_map.tied and key_map.config.tie_word_embeddings:
            continue
        rule = key_map.target(keys[0]).rule
        lead, shape = (entry.shape[:1], entry.shape[1:]) if rule.experts and rule.experts != PER_EXPERT else ((), entry.shape)
        rows = [key_map.part_rows(k) or shape[0] for k in keys]
        if sum(rows) != shape[0]:
            problems.append(
                f"shape mismatch: {hf_key} in {entry.file} has {shape[0]} rows but the config's "
                f"dimensions give {rows} for {keys}"
            )
            continue
        for key, n in zip(keys, rows):
            if rule.experts == PER_EXPERT:
                experts[key] = experts.get(key, 0) + 1
                lead = (experts[key],)
            specs[key] = (entry.dtype, (*lead, n, *shape[1:]))
    _fail(problems, f"the checkpoint at {where} does not match {key_map.name}")
    return specs


def saved_config(base: dict[str, Any], key_map: KeyMap, specs: dict[str, TensorSpec], destinations: dict[str, Placement]) -> dict[str, Any]:
    """The config of weights saved as ``specs`` (dtype when there is one, tied unless lm_head is written)."""
    tied = not any(d.hf_key in key_map.tied for d in destinations.values())
    dtypes = {s.dtype for s in specs.values()}
    return output_config(base, dtypes.pop() if len(dtypes) == 1 else None, tied)
