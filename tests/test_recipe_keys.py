"""torchtune 0.6.1's own configs in our recipes: only the checkpointer block changed; every key honoured or refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from stock_recipes import stock_config
from test_recipes import run_recipe
from test_torchtune_recipes import DIMS, LORA, stock_inputs  # noqa: F401 - the module fixture
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from checkpointer import CheckpointError, DistributedHFCheckpointer, ModelConfig
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.train.builders import build_model
from checkpointer.train.fsdp import build_sharded_model, checkpoint_activations
from checkpointer.train.recipe_keys import REFUSED, global_batch_size, refuse_unsupported


def _tiny(inputs, out, lora: bool) -> list[str]:
    """Tiny dimensions and local data for torchtune's config; the checkpointer block is ours."""
    builder = "torchtune.models.llama3_2." + ("lora_llama3_2" if lora else "llama3_2")
    model = {**DIMS, "max_seq_len": 256, "rope_base": 500000, **(LORA if lora else {})}
    return [
        f"model._component_={builder}", *(f"model.{k}={v}" for k, v in model.items()),
        f"tokenizer.path={inputs / 'tokenizer.model'}", "tokenizer.max_seq_len=64",
        "dataset.source=json", f"dataset.data_files={inputs / 'alpaca.json'}", "dataset.split=train",
        "device=cpu", "dtype=fp32", "epochs=2", "max_steps_per_epoch=2", "batch_size=2",
        f"output_dir={out}", "checkpointer._component_=checkpointer.DistributedHFCheckpointer",
        f"checkpointer.checkpoint_dir={inputs / 'base'}", f"checkpointer.output_dir={out}",
    ]  # fmt: skip


@pytest.mark.parametrize(("recipe", "config", "lora"), [
    ("full_finetune_distributed", "llama3_2/1B_full.yaml", False),
    ("lora_finetune_distributed", "llama3_2/1B_lora.yaml", True),
])  # fmt: skip
def test_torchtunes_own_config_runs_in_our_recipe(stock_inputs, tmp_path, recipe, config, lora):  # noqa: F811
    """Its keys as shipped (gradient_accumulation_steps: 8, seed: null, metric_logger, log_every_n_steps...),
    plus activation checkpointing switched on."""
    out = tmp_path / "out"
    extra = ["enable_activation_checkpointing=True", "gradient_accumulation_steps=2"]
    run_recipe(recipe, str(stock_config(config)), 2, *_tiny(stock_inputs, out, lora), *extra)
    for epoch in ("epoch_0", "epoch_1"):
        assert json.loads((out / epoch / MANIFEST_FILE).read_text())["world_size"] == 2
    logged = [line for f in (out / "logs").glob("*.txt") for line in f.read_text().splitlines()]
    assert [line.split()[0] for line in logged] == ["Step", "Step", "Step", "Step"] and all("loss:" in line for line in logged)
    if lora:
        assert (out / "epoch_1" / "adapter" / "adapter_model.safetensors").exists()


def test_every_refused_key_is_named():
    on = OmegaConf.create({"compile": True, "enable_activation_offloading": True, "fsdp_cpu_offload": True,
                           "optimizer_in_bwd": True, "enable_async_checkpointing": True, "dataset": {"packed": True},
                           "profiler": {"enabled": True}, "ac_mode": "selective", "ac_option": 2, "shuffle": False})  # fmt: skip
    with pytest.raises(CheckpointError) as refused:
        refuse_unsupported(on)
    for key in [*REFUSED, "shuffle"]:
        assert f"{key}=" in str(refused.value)
    off = OmegaConf.create({"compile": False, "enable_activation_offloading": False, "fsdp_cpu_offload": False,
                            "optimizer_in_bwd": False, "dataset": {"packed": False}, "profiler": {"enabled": False}, "shuffle": True})  # fmt: skip
    refuse_unsupported(off)  # torchtune's configs as shipped


def test_gradient_accumulation_sets_the_global_batch():
    assert global_batch_size(OmegaConf.create({"batch_size": 4, "gradient_accumulation_steps": 8}), 2) == 64
    assert global_batch_size(OmegaConf.create({"batch_size": 4, "global_batch_size": 16}), 2) == 16
    with pytest.raises(CheckpointError, match="global_batch_size=16 but batch_size=4 x gradient_accumulation_steps=8"):
        global_batch_size(OmegaConf.create({"batch_size": 4, "gradient_accumulation_steps": 8, "global_batch_size": 16}), 2)


def test_activation_checkpointing_wraps_every_layer_and_keeps_the_logits(tiny_models, tmp_path):
    base = tiny_models["llama3_2_9_heads"]
    checkpointer = DistributedHFCheckpointer(base, tmp_path / "out", "LLAMA3_2").open()
    config = ModelConfig.from_dict(checkpointer.config_dict)
    plain, wrapped = build_model("LLAMA3_2", config), checkpoint_activations(build_model("LLAMA3_2", config))
    assert all(isinstance(layer, CheckpointWrapper) for layer in wrapped.layers)
    for model in (plain, wrapped):
        checkpointer.load_model(model)
    tokens = torch.tensor([[1, 5, 9, 33, 7, 100]])
    assert torch.equal(plain(tokens), wrapped(tokens))


def _shard_with_custom_layers(rank: int, world: int, untied: str, tied: str) -> dict:
    from torch.distributed.fsdp import FSDPModule

    def build(base: str, model_type: str):
        config = ModelConfig.from_dict(DistributedHFCheckpointer(base, base, model_type).open().config_dict)
        return build_sharded_model(model_type, config, custom_sharded_layers=["tok_embeddings", "output"])

    model = build(untied, "LLAMA3")
    DistributedHFCheckpointer(untied, untied, "LLAMA3").load_model(model)
    logits = model(torch.tensor([[1, 5, 9, 33]])).detach()
    try:
        build(tied, "LLAMA3_2")
        refused = None
    except CheckpointError as e:
        refused = str(e)
    return {"sharded": isinstance(model.tok_embeddings, FSDPModule) and isinstance(model.output, FSDPModule), "logits": logits, "refused": refused}


def test_custom_sharded_layers_shard_untied_layers_and_refuse_tied_ones(tiny_models):
    from transformers import AutoModelForCausalLM

    results = run_on_ranks(_shard_with_custom_layers, 2, str(tiny_models["llama3"]), str(tiny_models["llama3_2_tied_scaled"]))
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama3"], dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected = hf(torch.tensor([[1, 5, 9, 33]])).logits
    for result in results:
        assert result["sharded"]
        assert (result["logits"] - expected).abs().max() < 1e-4
        assert "custom_sharded_layers: 'tok_embeddings' cannot be sharded on its own: the output is tied" in result["refused"]
