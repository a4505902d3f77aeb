"""Every shipped config parses, instantiates, and names only what the library can do (no weights needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tune_config
from torchtune.config._utils import _get_component_from_path

from checkpointer import DistributedHFCheckpointer
from checkpointer.format.model_config import ModelConfig
from checkpointer.mapping.key_maps import KEY_MAPS, adapter_key_map, get_key_map
from checkpointer.train.builders import REGISTRY, LoraSpec

CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))
_LORA_TARGETS = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj", "output_proj": "attn.output_proj"}
_DIMS = ModelConfig.from_dict({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2})


def _load(path: Path):
    cfg = OmegaConf.load(path)
    for key in ("checkpoint_dir", "output_dir"):  # the tiny configs leave these to the command line (???)
        if OmegaConf.is_missing(cfg.checkpointer, key):
            cfg.checkpointer[key] = f"/tmp/{key}"
    return cfg


def test_there_are_configs_for_the_real_models():
    names = {p.relative_to(p.parents[1]).as_posix() for p in CONFIGS}
    for expected in ("llama3_2/1B_full.yaml", "llama3_2/3B_lora.yaml", "llama3_1/8B_lora.yaml", "qwen2_5/0.5B_full.yaml",
                     "qwen2_5/7B_lora.yaml", "qwen3/8B_lora.yaml", "mistral/7B_lora.yaml", "phi3/mini_lora.yaml",
                     "qwen3_moe/30B_A3B_full.yaml", "qwen3_moe/30B_A3B_lora.yaml", "mixtral/8x7B_full.yaml",
                     "mixtral/8x7B_lora.yaml", "tiny/moe_full.yaml", "tiny/moe_lora.yaml"):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_config_instantiates(path, private_cache):
    cfg = _load(path)
    checkpointer = tune_config.instantiate(cfg.checkpointer)
    assert isinstance(checkpointer, DistributedHFCheckpointer)
    model_type = str(cfg.checkpointer.model_type)
    assert model_type in KEY_MAPS and model_type in REGISTRY
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = tune_config.instantiate(cfg.optimizer, [parameter])
    if cfg.get("lr_scheduler"):
        tune_config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=10)
    tune_config.instantiate(cfg.loss)
    assert callable(_get_component_from_path(cfg.dataset._component_))
    assert int(cfg.global_batch_size) >= 1 and int(cfg.batch_size) >= 1 and int(cfg.epochs) >= 1
    lora = (cfg.get("model") or {}).get("lora")
    if lora is not None:
        _check_lora_targets_have_peft_names(model_type, lora)


def _check_lora_targets_have_peft_names(model_type: str, lora) -> None:
    spec = LoraSpec(**{**OmegaConf.to_container(lora), "lora_attn_modules": tuple(lora.lora_attn_modules)})
    adapters = adapter_key_map(get_key_map(model_type, _DIMS))
    targets = [_LORA_TARGETS[m] for m in spec.lora_attn_modules]
    targets += ["mlp.w1", "mlp.w2", "mlp.w3"] if spec.apply_lora_to_mlp else []
    for target in targets:
        for part in ("lora_a", "lora_b"):
            adapters.target(f"layers.0.{target}.{part}.weight")  # raises if PEFT has no name for it
