"""torchtune 0.6.1's own recipe files, unmodified, from the installed wheel, with only the checkpointer block changed.

Each recipe runs its own config from the wheel (``llama3_2/1B_full.yaml``...), with tiny model
dimensions and local data as overrides, on CPU with gloo; ``stock_recipes.py`` shims only
the CUDA-only calls. The same run with torchtune's ``FullModelHFCheckpointer`` is the reference.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stock_recipes import stock_config

from checkpointer import DistributedHFCheckpointer
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.testing.multiprocess import free_port
from checkpointer.testing.tiny_models import write_tiny_model

HERE = Path(__file__).resolve().parent
OURS = "checkpointer.DistributedHFCheckpointer"
# torchtune's llama3_2 builder with the tiny base's dimensions (its tokenizer's special ids need 128256 rows)
DIMS = {"vocab_size": 128256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "intermediate_dim": 64}
LORA = {"lora_rank": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def stock_inputs(tmp_path_factory) -> Path:
    """A tiny Llama 3.2 base, a byte-level tiktoken file for torchtune's llama3 tokenizer, alpaca-style rows."""
    root = tmp_path_factory.mktemp("stock")
    write_tiny_model(
        "LLAMA3_2", root / "base", vocab_size=DIMS["vocab_size"], hidden_size=DIMS["embed_dim"],
        intermediate_size=DIMS["intermediate_dim"], rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000, eos_token_id=128001, pad_token_id=128004,
    )  # fmt: skip
    (root / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    words = ["cat", "dog", "sun", "sky", "red", "blue", "tree", "rock"] * 4
    rows = [{"instruction": f"Say {w} {i % 5 + 1} times.", "input": "", "output": f"{w} " * (i % 5 + 1)} for i, w in enumerate(words)]
    (root / "alpaca.json").write_text(json.dumps(rows))
    return root


def _overrides(inputs: Path, out: Path, lora: bool, ours: bool) -> list[str]:
    builder = "torchtune.models.llama3_2." + ("lora_llama3_2" if lora else "llama3_2")
    model = {**DIMS, "max_seq_len": 256, "rope_base": 500000, **(LORA if lora else {})}
    checkpointer = [f"checkpointer._component_={OURS}"] if ours else ["checkpointer.checkpoint_files=[model.safetensors]"]
    return [
        f"model._component_={builder}", *(f"model.{k}={v}" for k, v in model.items()),
        f"tokenizer.path={inputs / 'tokenizer.model'}", "tokenizer.max_seq_len=64",
        "dataset.source=json", f"dataset.data_files={inputs / 'alpaca.json'}", "dataset.split=train",
        "device=cpu", "dtype=fp32", "seed=0", "epochs=2", "max_steps_per_epoch=2", "batch_size=2",
        "gradient_accumulation_steps=1", "optimizer._component_=torch.optim.AdamW",
        f"output_dir={out}", f"checkpointer.checkpoint_dir={inputs / 'base'}", f"checkpointer.output_dir={out}",
        *checkpointer,
    ]  # fmt: skip


def run_stock(recipe: str, config: str, nproc: int, inputs: Path, out: Path, *extra: str, lora: bool = False, ours: bool = True) -> str:
    """torchtune's ``recipes/<recipe>.py`` from the wheel with its ``config``, on ``nproc`` processes."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    command = [sys.executable, *launcher, str(HERE / "stock_recipes.py"), recipe, "--config", str(stock_config(config))]
    command += [*_overrides(inputs, out, lora, ours), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", CHECKPOINTER_PROGRESS="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{recipe} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout + done.stderr


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files directly in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_bitwise_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), key


def _interrupted(out: Path, target: Path, keep: str = "epoch_0") -> Path:
    """The output folder as it was right after ``keep`` was published."""
    target.mkdir()
    shutil.copytree(out / keep, target / keep)
    return target


@pytest.fixture(scope="module")
def full_runs(stock_inputs, tmp_path_factory):
    """full_finetune_distributed on 2 processes: ours, torchtune's checkpointer, and ours resumed after epoch 0."""
    root = tmp_path_factory.mktemp("full")
    run_stock("full_finetune_distributed", "llama3_2/1B_full.yaml", 2, stock_inputs, root / "ours")
    run_stock("full_finetune_distributed", "llama3_2/1B_full.yaml", 2, stock_inputs, root / "torchtune", ours=False)
    resumed = _interrupted(root / "ours", root / "resumed")
    run_stock(
        "full_finetune_distributed", "llama3_2/1B_full.yaml", 2, stock_inputs, resumed,
        "resume_from_checkpoint=True", "checkpointer.resume_from_checkpoint=True",
    )  # fmt: skip
    return root


def test_full_distributed_saves_shards_on_every_rank_bitwise_as_torchtune(full_runs):
    ours = full_runs / "ours"
    assert sorted(p.name for p in (ours / "epoch_0" / "training_state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for epoch in ("epoch_0", "epoch_1"):
        assert json.loads((ours / epoch / MANIFEST_FILE).read_text())["world_size"] == 2
        assert_bitwise_equal(weights(ours / epoch), weights(full_runs / "torchtune" / epoch))
    assert not torch.equal(*(weights(ours / e)["model.norm.weight"] for e in ("epoch_0", "epoch_1")))  # it trained


def test_full_distributed_resume_reaches_the_uninterrupted_weights(full_runs):
    assert_bitwise_equal(weights(full_runs / "resumed" / "epoch_1"), weights(full_runs / "ours" / "epoch_1"))


def test_load_checkpoint_when_resuming_follows_torchtunes_contract_and_agrees_with_load_model(full_runs, stock_inputs):
    from torchtune.models.llama3_2 import llama3_2

    checkpointer = DistributedHFCheckpointer(stock_inputs / "base", full_runs / "ours", "LLAMA3_2", resume_from_checkpoint=True)
    checkpoint = checkpointer.load_checkpoint()
    saved = {**checkpoint["model"]}
    assert (checkpoint["seed"], checkpoint["epochs_run"], checkpoint["total_epochs"], checkpoint["max_steps_per_epoch"]) == (0, 1, 2, 2)
    assert "dataloader" in checkpoint
    model = llama3_2(**DIMS, max_seq_len=256)
    checkpointer.load_model(model)
    assert sorted(saved) == sorted(model.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # the same (resumed) weights
    base = DistributedHFCheckpointer(stock_inputs / "base", full_runs / "unused", "LLAMA3_2").load_checkpoint()["model"]
    assert not torch.equal(base["norm.scale"], saved["norm.scale"])
    # the optimizer state as load_from_full_optimizer_state_dict takes it: full tensors keyed by parameter name
    optimizer = checkpoint["optimizer"]
    assert sorted(optimizer["state"]) == sorted(saved) == sorted(optimizer["param_groups"][0]["params"])
    assert all(optimizer["state"][k]["exp_avg"].shape == v.shape for k, v in saved.items())
    adamw = torch.optim.AdamW(model.parameters())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, adamw, optimizer, options=StateDictOptions(full_state_dict=True))
    first = next(iter(model.parameters()))
    assert torch.equal(adamw.state[first]["exp_avg"], optimizer["state"]["tok_embeddings.weight"]["exp_avg"])


# Tensor parallel in torchtune's own recipe: the untied llama3 builder (base_llama_tp_plan shards `output`;
# the tied llama3_2 one fails in its first forward with either checkpointer), 2 x 2 ("dp", "tp") on 4 processes.
TENSOR_PARALLEL = [
    "model._component_=torchtune.models.llama3.llama3", "checkpointer.model_type=LLAMA3",
    "tensor_parallel_dim=2", "tensor_parallel_plan._component_=torchtune.models.llama3.base_llama_tp_plan", "optimizer.fused=False",
]  # fmt: skip


@pytest.fixture(scope="module")
def tensor_parallel_runs(stock_inputs, tmp_path_factory):
    """full_finetune_distributed with tensor_parallel_dim=2 on 4 processes, ours and torchtune's checkpointer, from an untied base."""
    root = tmp_path_factory.mktemp("tp")
    inputs = root / "inputs"
    inputs.mkdir()
    for name in ("tokenizer.model", "alpaca.json"):
        shutil.copy(stock_inputs / name, inputs / name)
    write_tiny_model(
        "LLAMA3", inputs / "base", vocab_size=DIMS["vocab_size"], hidden_size=DIMS["embed_dim"], intermediate_size=DIMS["intermediate_dim"],
        bos_token_id=128000, eos_token_id=128001, pad_token_id=128004,
    )  # fmt: skip
    for who, ours in (("ours", True), ("torchtune", False)):
        run_stock("full_finetune_distributed", "llama3_2/1B_full.yaml", 4, inputs, root / who, *TENSOR_PARALLEL, ours=ours)
    return root


def test_full_distributed_with_tensor_parallel_saves_bitwise_as_torchtune(tensor_parallel_runs):
    ours = tensor_parallel_runs / "ours"
    for epoch in ("epoch_0", "epoch_1"):
        assert json.loads((ours / epoch / MANIFEST_FILE).read_text())["world_size"] == 4
        assert_bitwise_equal(weights(ours / epoch), weights(tensor_parallel_runs / "torchtune" / epoch))
    assert "lm_head.weight" in weights(ours / "epoch_0")
    assert not torch.equal(*(weights(ours / e)["model.norm.weight"] for e in ("epoch_0", "epoch_1")))  # it trained


@pytest.fixture(scope="module")
def lora_runs(stock_inputs, tmp_path_factory):
    """lora_finetune_distributed on 2 processes (it saves on rank 0 only): ours, torchtune's, ours resumed."""
    root = tmp_path_factory.mktemp("lora")
    run_stock("lora_finetune_distributed", "llama3_2/1B_lora.yaml", 2, stock_inputs, root / "ours", lora=True)
    run_stock("lora_finetune_distributed", "llama3_2/1B_lora.yaml", 2, stock_inputs, root / "torchtune", lora=True, ours=False)
    resumed = _interrupted(root / "ours", root / "resumed")
    run_stock(
        "lora_finetune_distributed", "llama3_2/1B_lora.yaml", 2, stock_inputs, resumed,
        "resume_from_checkpoint=True", "checkpointer.resume_from_checkpoint=True", lora=True,
    )  # fmt: skip
    return root


def test_lora_distributed_rank0_saves_merged_weights_and_adapter_bitwise_as_torchtune(lora_runs):
    ours, theirs = lora_runs / "ours", lora_runs / "torchtune"
    for epoch in ("epoch_0", "epoch_1"):
        merged = weights(theirs / epoch)
        adapter = {k: merged.pop(k) for k in [k for k in merged if ".lora_" in k]}  # torchtune puts both at the top
        assert_bitwise_equal(weights(ours / epoch), merged)
        assert_bitwise_equal(weights(ours / epoch / "adapter"), adapter)
        assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # the adapter trained


def test_lora_distributed_resume_reaches_the_uninterrupted_adapter(lora_runs):
    for folder in ("", "adapter"):
        assert_bitwise_equal(weights(lora_runs / "resumed" / "epoch_1" / folder), weights(lora_runs / "ours" / "epoch_1" / folder))


@pytest.mark.soak  # seven recipe runs: make soak
@pytest.mark.parametrize(("recipe", "config", "lora"), [
    ("full_finetune_single_device", "llama3_2/1B_full_single_device.yaml", False),
    ("lora_finetune_single_device", "llama3_2/1B_lora_single_device.yaml", True),
])  # fmt: skip
def test_single_device_recipes_save_and_resume_as_with_torchtunes_checkpointer(stock_inputs, tmp_path, recipe, config, lora):
    """Bitwise torchtune's files; the full recipe resumes to the uninterrupted weights.

    torchtune 0.6.1's LoRA single-device recipe does not reproduce its uninterrupted run when
    resumed, with its own checkpointer either: there the resume must end where torchtune's ends.
    """
    run_stock(recipe, config, 1, stock_inputs, tmp_path / "ours", lora=lora)
    run_stock(recipe, config, 1, stock_inputs, tmp_path / "torchtune", lora=lora, ours=False)
    resumed = _interrupted(tmp_path / "ours", tmp_path / "resumed")
    run_stock(recipe, config, 1, stock_inputs, resumed, "resume_from_checkpoint=True", "checkpointer.resume_from_checkpoint=True", lora=lora)
    theirs = weights(tmp_path / "torchtune" / "epoch_1")
    adapter = {k: theirs.pop(k) for k in [k for k in theirs if ".lora_" in k]}
    assert_bitwise_equal(weights(tmp_path / "ours" / "epoch_1"), theirs)
    if not lora:
        assert_bitwise_equal(weights(resumed / "epoch_1"), theirs)
        return
    assert_bitwise_equal(weights(tmp_path / "ours" / "epoch_1" / "adapter"), adapter)
    their_resume = _interrupted(tmp_path / "torchtune", tmp_path / "torchtune_resumed")
    shutil.copytree(tmp_path / "torchtune" / "recipe_state", their_resume / "recipe_state")
    run_stock(recipe, config, 1, stock_inputs, their_resume, "resume_from_checkpoint=True", lora=lora, ours=False)
    theirs = weights(their_resume / "epoch_1")
    adapter = {k: theirs.pop(k) for k in [k for k in theirs if ".lora_" in k]}
    assert_bitwise_equal(weights(resumed / "epoch_1"), theirs)
    assert_bitwise_equal(weights(resumed / "epoch_1" / "adapter"), adapter)
