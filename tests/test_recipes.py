"""The tune run recipes on a tiny model: real processes, real configs with command-line overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from variants import TOKENS, hf_logits

from checkpointer import DistributedHFCheckpointer
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.train.builders import LoraSpec, build_model_from_dir

REPO = Path(__file__).resolve().parent.parent
TUNE = Path(sys.executable).with_name("tune")


def run_recipe(recipe: str, config: str, nproc: int, *overrides: str, timeout: int = 600) -> str:
    """``tune run --nproc_per_node N recipes/<recipe>.py --config <config> k=v ...``; returns stdout."""
    command = [str(TUNE), "run", "--nproc_per_node", str(nproc), f"recipes/{recipe}.py", "--config", config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", CHECKPOINTER_PROGRESS="0")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


def losses(metrics: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, metrics.read_text().splitlines())}


def _full_run(base: Path, out: Path, metrics: Path, nproc: int, *extra: str) -> str:
    return run_recipe(
        "full_finetune_distributed", "configs/tiny/full.yaml", nproc,
        f"checkpointer.checkpoint_dir={base}", f"checkpointer.output_dir={out}", f"metrics_file={metrics}",
        "epochs=2", "max_steps_per_epoch=3", "save_every_n_steps=2", *extra,
    )  # fmt: skip


def _lora_run(base: Path, out: Path, metrics: Path, nproc: int, *extra: str) -> str:
    return run_recipe(
        "lora_finetune_distributed", "configs/tiny/lora.yaml", nproc,
        f"checkpointer.checkpoint_dir={base}", f"checkpointer.output_dir={out}", f"metrics_file={metrics}",
        "checkpointer.model_type=QWEN2", "epochs=2", "max_steps_per_epoch=3", "save_every_n_steps=2", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    """A 2-rank full fine-tune of 2 epochs x 3 steps, checkpointing every 2 steps and each epoch."""
    root = tmp_path_factory.mktemp("full")
    base = tiny_models["llama3_2_9_heads"]
    _full_run(base, root / "out", root / "metrics.jsonl", 2)
    return base, root


def test_full_recipe_trains_and_publishes_every_checkpoint(uninterrupted):
    base, root = uninterrupted
    seen = losses(root / "metrics.jsonl")
    assert sorted(seen) == [1, 2, 3, 4, 5, 6] and seen[6] < seen[1]
    names = sorted(p.name for p in (root / "out").iterdir() if not p.name.startswith("."))
    assert names == ["epoch_0", "epoch_1", "step_2", "step_4", "step_6"]
    for name in names:
        manifest = json.loads((root / "out" / name / MANIFEST_FILE).read_text())
        assert manifest["contents"]["training_state"] == (name != "epoch_1")  # the last save is weights only
    trained = hf_logits(root / "out" / "epoch_1")
    assert (trained - hf_logits(base)).abs().max() > 1e-3  # it trained, and transformers loads the result


def _interrupted_copy(root: Path, keep_through: str, target: Path) -> Path:
    """The output folder as it was right after checkpoint ``keep_through`` was published."""
    order = ["step_2", "epoch_0", "step_4", "step_6", "epoch_1"]
    shutil.copytree(root / "out", target)
    for name in order[order.index(keep_through) + 1 :]:
        shutil.rmtree(target / name)
    return target


@pytest.mark.parametrize("nproc", [2, 1, 3])
def test_resume_reproduces_the_uninterrupted_losses(uninterrupted, tmp_path, nproc):
    base, root = uninterrupted
    out = _interrupted_copy(root, "step_4", tmp_path / "out")
    _full_run(base, out, tmp_path / "metrics.jsonl", nproc, "checkpointer.resume_from_checkpoint=true")
    expected, resumed = losses(root / "metrics.jsonl"), losses(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == [5, 6]  # it continued after step 4
    for step in (5, 6):
        if nproc == 2:
            assert resumed[step] == expected[step], (step, resumed[step], expected[step])
        else:
            assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5)
    final = hf_logits(out / "epoch_1")
    reference = hf_logits(root / "out" / "epoch_1")
    assert (final - reference).abs().max() <= (0 if nproc == 2 else 1e-3)


def test_keep_last_n_checkpoints_prunes_the_oldest(tiny_models, tmp_path):
    base = tiny_models["llama3"]
    _full_run(base, tmp_path / "out", tmp_path / "m.jsonl", 2, "checkpointer.model_type=LLAMA3", "checkpointer.keep_last_n_checkpoints=2")
    (tmp_path / "out" / "notes.txt").write_text("mine")  # something the user put there is never touched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".checkpointer.lock", "epoch_1", "notes.txt", "step_6"]


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_models["qwen2_untied"]
    _lora_run(base, root / "out", root / "m.jsonl", 2)
    return base, root


def test_lora_adapter_loads_in_peft_with_the_same_logits(lora_run):
    base, root = lora_run
    final = root / "out" / "epoch_1"
    adapter = final / "adapter"  # beside merged weights the adapter has its own folder
    assert not (final / "adapter_config.json").exists()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base) and adapter_config["r"] == 4
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    _assert_peft_matches(base, final, "QWEN2", LoraSpec(("q_proj", "k_proj", "v_proj", "output_proj"), True, False, 4, 8.0))


def _assert_peft_matches(base: Path, final: Path, model_type: str, lora: LoraSpec) -> None:
    """Our model with the adapter of ``final`` gives PEFT's logits and those of the merged weights beside it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = final / "adapter"
    model = build_model_from_dir(model_type, base, lora=lora)
    checkpointer = DistributedHFCheckpointer(base, final.parent.parent / "unused", model_type)
    checkpointer.load_model(model)
    checkpointer.load_adapter(model, adapter)
    with torch.no_grad():
        tune_logits = model(TOKENS)
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        peft_logits = peft_model(TOKENS).logits
    assert (peft_logits - tune_logits).abs().max() <= 1e-5
    assert (hf_logits(final) - tune_logits).abs().max() <= 1e-5  # the merged weights published alongside
    assert (tune_logits - hf_logits(base)).abs().max() > 1e-4  # the adapter changed something


def test_lora_resume_continues_with_the_same_losses(lora_run, tmp_path):
    base, root = lora_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for name in ("step_6", "epoch_1"):
        shutil.rmtree(out / name)
    assert not (out / "step_4" / "model.safetensors").exists() and (out / "step_4" / "adapter_model.safetensors").exists()
    _lora_run(base, out, tmp_path / "m.jsonl", 2, "checkpointer.resume_from_checkpoint=true")
    expected, resumed = losses(root / "m.jsonl"), losses(tmp_path / "m.jsonl")
    assert sorted(resumed) == [5, 6] and all(resumed[s] == expected[s] for s in (5, 6))


def test_python_launch_without_torchrun(tiny_models, tmp_path):
    """``python recipes/x.py --config ...`` runs as one rank with its own process group."""
    base = tiny_models["mistral"]
    command = [
        sys.executable, "recipes/full_finetune_distributed.py", "--config", "configs/tiny/full.yaml",
        f"checkpointer.checkpoint_dir={base}", f"checkpointer.output_dir={tmp_path / 'out'}",
        "checkpointer.model_type=MISTRAL", "epochs=1", "max_steps_per_epoch=2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "step 2 loss" in done.stdout
    assert (tmp_path / "out" / "epoch_0" / MANIFEST_FILE).exists()


def _moe_run(recipe: str, config: str, base: Path, out: Path, metrics: Path, nproc: int, *extra: str) -> str:
    return run_recipe(
        recipe, config, nproc,
        f"checkpointer.checkpoint_dir={base}", f"checkpointer.output_dir={out}", f"metrics_file={metrics}",
        "epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=2", *extra,
    )  # fmt: skip


def test_moe_trains_on_2_ranks_and_resumes_on_3(tiny_models, tmp_path):
    """8 experts: whole experts per rank on 2 (4 + 4) and on 3 (3 + 3 + 2); the router aux loss is in the loss."""
    base = tiny_models["qwen3_moe"]
    _moe_run("full_finetune_distributed", "configs/tiny/moe_full.yaml", base, tmp_path / "out", tmp_path / "m.jsonl", 2)
    expected = losses(tmp_path / "m.jsonl")
    assert sorted(expected) == [1, 2, 3, 4] and expected[4] < expected[1]
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "out", out)
    for name in ("step_4", "epoch_0"):
        shutil.rmtree(out / name)
    _moe_run("full_finetune_distributed", "configs/tiny/moe_full.yaml", base, out, tmp_path / "r.jsonl", 3, "checkpointer.resume_from_checkpoint=true")
    resumed = losses(tmp_path / "r.jsonl")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):  # other ranks, other micro-batches: the load-balancing loss is not additive over them
        assert resumed[step] == pytest.approx(expected[step], rel=1e-3), (step, resumed[step], expected[step])
    final = hf_logits(out / "epoch_0")
    assert (final - hf_logits(tmp_path / "out" / "epoch_0")).abs().max() <= 1e-2
    assert (final - hf_logits(base)).abs().max() > 1e-3  # it trained, and transformers loads the result


def test_moe_lora_adapter_loads_in_peft_with_the_same_logits(tiny_models, tmp_path):
    base = tiny_models["qwen3_moe"]
    _moe_run("lora_finetune_distributed", "configs/tiny/moe_lora.yaml", base, tmp_path / "out", tmp_path / "m.jsonl", 2, "max_steps_per_epoch=2")
    final = tmp_path / "out" / "epoch_0"
    assert set(json.loads((final / "adapter" / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    _assert_peft_matches(base, final, "QWEN3_MOE", LoraSpec(("q_proj", "k_proj", "v_proj", "output_proj"), False, False, 4, 8.0))


@pytest.fixture(scope="module")
def tensor_parallel_run(tiny_models, tmp_path_factory):
    """A 4-rank full fine-tune, tensor parallel 2 x FSDP2 2 (torchtune's ``tensor_parallel_dim`` and plan), checkpointing as above."""
    root = tmp_path_factory.mktemp("tp")
    base = tiny_models["llama3"]  # untied; 4 heads, 2 kv heads: each FSDP shard of a TP rank holds half a kv head
    _full_run(
        base, root / "out", root / "metrics.jsonl", 4, "checkpointer.model_type=LLAMA3", "tensor_parallel_dim=2",
        "tensor_parallel_plan._component_=torchtune.models.llama3.base_llama_tp_plan",
    )  # fmt: skip
    return base, root


@pytest.mark.parametrize("nproc", [2, 3])
def test_a_tensor_parallel_run_resumes_on_fsdp_only(tensor_parallel_run, tmp_path, nproc):
    base, root = tensor_parallel_run
    assert sorted(losses(root / "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]
    out = _interrupted_copy(root, "step_4", tmp_path / "out")
    _full_run(base, out, tmp_path / "metrics.jsonl", nproc, "checkpointer.model_type=LLAMA3", "checkpointer.resume_from_checkpoint=true")
    expected, resumed = losses(root / "metrics.jsonl"), losses(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5)
    assert (hf_logits(out / "epoch_1") - hf_logits(root / "out" / "epoch_1")).abs().max() <= 1e-3
