"""Key maps against transformers, fast and in one process: for every tiny variant, the torchtune
model's keys map onto exactly the tensors transformers wrote, and back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from variants import VARIANTS

from checkpointer.errors import CheckpointArgumentError, CheckpointMismatchError
from checkpointer.format.folder import LocalFolder
from checkpointer.format.hf_files import CONFIG_FILE, read_checkpoint_files
from checkpointer.format.model_config import ModelConfig
from checkpointer.mapping.key_maps import get_key_map, stored_keys
from checkpointer.train.builders import build_model


def _setup(name: str, folder: Path) -> tuple[ModelConfig, set[str], set[str]]:
    """The variant's config, the HF keys in its files, and its torchtune model's keys (built on meta)."""
    config = ModelConfig.from_json((folder / CONFIG_FILE).read_text())
    hf_keys = set(read_checkpoint_files(LocalFolder(folder)).tensors)
    with torch.device("meta"):
        tune_keys = set(build_model(VARIANTS[name].model_type, config).state_dict())
    return config, hf_keys, tune_keys


@pytest.mark.parametrize("name", VARIANTS)
def test_torchtune_keys_map_onto_exactly_the_tensors_transformers_writes(name: str, tiny_models: dict[str, Path]) -> None:
    config, hf_keys, tune_keys = _setup(name, tiny_models[name])
    key_map = get_key_map(VARIANTS[name].model_type, config).for_hf_keys(hf_keys)
    targets = {key: key_map.target(key) for key in tune_keys}
    stored = {k for t in targets.values() for k in stored_keys(t.hf_key, t.rule, config.num_experts or 0)}
    assert stored == {k for k in hf_keys if not key_map.is_ignored(k)}
    for key, target in targets.items():  # and back: each HF tensor names the tune keys stored in it
        assert key in target.parts and (target.rule.experts or key in key_map.tune_keys(target.hf_key)), key


def test_a_key_the_model_type_does_not_know_is_a_mismatch_naming_it(tiny_models: dict[str, Path]) -> None:
    config, _, _ = _setup("llama3", tiny_models["llama3"])
    with pytest.raises(CheckpointMismatchError, match="'layers.0.attn.extra.weight'") as info:
        get_key_map("LLAMA3", config).target("layers.0.attn.extra.weight")
    assert info.value.key == "layers.0.attn.extra.weight"


def test_an_unknown_model_type_is_a_value_error_naming_the_argument(tiny_models: dict[str, Path]) -> None:
    config, _, _ = _setup("llama3", tiny_models["llama3"])
    with pytest.raises(ValueError, match="model_type 'GPT2' is not supported") as info:
        get_key_map("GPT2", config)
    assert isinstance(info.value, CheckpointArgumentError) and info.value.key == "model_type"
