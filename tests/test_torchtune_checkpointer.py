"""torchtune 0.6.1's ``tests/torchtune/training/checkpointing/test_checkpointer.py`` cases, against our class.

Each case builds the same kind of base (random HF tensors, a ``config.json`` with only the
fields torchtune reads), loads and saves with ``DistributedHFCheckpointer``, and checks what
torchtune's test checks; where both can save the same state dict, the saved tensors are
compared bitwise with what torchtune's own ``FullModelHFCheckpointer`` writes. Where we differ
on purpose (weights only from safetensors; a single-file base saved as ``model.safetensors``;
an adapter beside merged weights in ``adapter/``), the test says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.models import gemma, llama2, mistral
from torchtune.modules.peft import get_adapter_params, get_lora_module_names
from torchtune.training.checkpointing import FullModelHFCheckpointer

from checkpointer import CheckpointError, CheckpointFormatError, DistributedHFCheckpointer
from checkpointer.format.peft import ADAPTER_DIR, ADAPTER_FILE

VOCAB, DIM, HIDDEN, HEADS, HEAD_DIM = 100, 64, 256, 4, 16


def _layer(i: int, kv_rows: int = DIM, q_rows: int = DIM, rotary: bool = True) -> dict[str, tuple[int, ...]]:
    prefix = f"model.layers.{i}."
    shapes = {
        "input_layernorm.weight": (DIM,), "post_attention_layernorm.weight": (DIM,),
        "self_attn.q_proj.weight": (q_rows, DIM), "self_attn.k_proj.weight": (kv_rows, DIM),
        "self_attn.v_proj.weight": (kv_rows, DIM), "self_attn.o_proj.weight": (DIM, q_rows),
        "mlp.gate_proj.weight": (HIDDEN, DIM), "mlp.down_proj.weight": (DIM, HIDDEN), "mlp.up_proj.weight": (HIDDEN, DIM),
    }  # fmt: skip
    if rotary:  # what old Llama-2 conversions carry, and neither torchtune nor we load
        shapes["self_attn.rotary_emb.inv_freq"] = (DIM,)
    return {prefix + k: v for k, v in shapes.items()}


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator).to(torch.float16) for k, s in shapes.items()}


def _write_base(folder: Path, files: dict[str, dict[str, torch.Tensor]], config: dict, index: bool = True) -> Path:
    folder.mkdir(parents=True)
    for name, tensors in files.items():
        save_file(tensors, folder / name)
    if index:
        weight_map = {key: name for name, tensors in files.items() for key in tensors}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA2_CONFIG = {"hidden_size": DIM, "num_attention_heads": HEADS, "num_key_value_heads": HEADS}


@pytest.fixture
def llama2_base(tmp_path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Layer 0 + embeddings + norm + lm_head in file 1, layer 1 in file 2; an index; a 3-field config."""
    first = _random({"model.embed_tokens.weight": (VOCAB, DIM), **_layer(0), "model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM)}, 16)
    second = _random(_layer(1), 17)
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    return _write_base(tmp_path / "checkpoint_dir", files, LLAMA2_CONFIG), first, second


def _llama2(layers: int, **lora) -> torch.nn.Module:
    dims = {"vocab_size": VOCAB, "num_layers": layers, "num_heads": HEADS, "num_kv_heads": HEADS, "embed_dim": DIM, "max_seq_len": 128}
    return llama2.lora_llama2(**dims, **lora) if lora else llama2.llama2(**dims)


def _torchtune_save(base: Path, files: list[str], model_type: str, out: Path, state_dict: dict, **kwargs) -> Path:
    """What torchtune's own checkpointer writes for ``state_dict`` (a copy: it converts in place)."""
    theirs = FullModelHFCheckpointer(checkpoint_dir=str(base), checkpoint_files=files, model_type=model_type, output_dir=str(out))
    theirs.load_checkpoint()  # it learns the weight map while loading
    copied = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state_dict.items()}
    theirs.save_checkpoint(copied, epoch=kwargs.pop("epoch", 1), **kwargs)
    return out / f"epoch_{1}"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), key


def test_load_save_single_file_named_by_absolute_path(llama2_base, tmp_path):
    base, first, _ = llama2_base
    ours = DistributedHFCheckpointer(str(base), str(tmp_path / "output_dir"), "LLAMA2", checkpoint_files=[base / "model-00001-of-00002.safetensors"])
    state_dict = ours.load_checkpoint()
    assert len(state_dict["model"]) + 1 == len(first)  # all but inv_freq
    _llama2(layers=1).load_state_dict(state_dict["model"])  # strict
    saved = Path(ours.save_checkpoint(state_dict, epoch=1))
    # we differ on purpose: a single-file base is saved as Hugging Face names one file
    assert sorted(p.name for p in saved.glob("*.safetensors")) == ["model.safetensors"]
    theirs = _torchtune_save(base, ["model-00001-of-00002.safetensors"], "LLAMA2", tmp_path / "torchtune", state_dict)
    _assert_bitwise(_tensors(saved), _tensors(theirs))
    assert len(_tensors(saved)) + 1 == len(first)


@pytest.mark.parametrize("named", [True, False], ids=["checkpoint_files_as_paths", "from_the_index"])
def test_save_load_multiple_files_keeps_the_split_despite_ignored_keys(llama2_base, tmp_path, named):
    base, first, second = llama2_base
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    files = [Path(base / n) for n in names] if named else None
    ours = DistributedHFCheckpointer(base, tmp_path / "output_dir", "LLAMA2", checkpoint_files=files)
    state_dict = ours.load_checkpoint()
    assert len(state_dict["model"]) + 2 == len(first) + len(second)
    _llama2(layers=2).load_state_dict(state_dict["model"])
    saved = Path(ours.save_checkpoint(state_dict, epoch=1))
    assert len(load_file(saved / names[0])) + 1 == len(first) and len(load_file(saved / names[1])) + 1 == len(second)
    theirs = _torchtune_save(base, names, "LLAMA2", tmp_path / "torchtune", state_dict)
    _assert_bitwise(_tensors(saved), _tensors(theirs))


def test_adapter_only_without_an_adapter_is_torchtunes_value_error_and_an_empty_adapter_saves(llama2_base, tmp_path):
    base, _, _ = llama2_base
    ours = DistributedHFCheckpointer(base, tmp_path / "output_dir", "LLAMA2", checkpoint_files=["model-00001-of-00002.safetensors"])
    state_dict = ours.load_checkpoint()
    with pytest.raises(ValueError, match="Adapter checkpoint not found in state_dict"):
        ours.save_checkpoint(state_dict, epoch=2, adapter_only=True)
    state_dict["adapter"] = {}
    saved = Path(ours.save_checkpoint(state_dict, epoch=2, adapter_only=True))
    assert not list(saved.glob("model*.safetensors"))
    assert load_file(saved / ADAPTER_FILE) == {}


def test_save_in_peft_format_bitwise_as_torchtune(llama2_base, tmp_path):
    base, _, _ = llama2_base
    ours = DistributedHFCheckpointer(base, tmp_path / "output_dir", "LLAMA2", checkpoint_files=["model-00001-of-00002.safetensors"])
    state_dict = ours.load_checkpoint()
    lora = {"lora_attn_modules": ["q_proj", "output_proj"], "apply_lora_to_mlp": True, "apply_lora_to_output": True, "lora_rank": 4, "lora_alpha": 8}
    model = _llama2(layers=1, **lora)
    model.load_state_dict(state_dict["model"], strict=False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: make the RoPE permutation of q_proj's B visible
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    adapter = {k: v for k, v in model.state_dict().items() if k in get_adapter_params(model)}
    modules = get_lora_module_names(lora["lora_attn_modules"], True, True)
    state_dict |= {"adapter": adapter, "adapter_config": {"r": 4, "lora_alpha": 8, "target_modules": modules, "peft_type": "LORA"}}
    saved = Path(ours.save_checkpoint(state_dict, epoch=1))
    config = json.loads((saved / ADAPTER_DIR / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "lm_head", "o_proj", "q_proj", "up_proj"]
    theirs = _torchtune_save(base, ["model-00001-of-00002.safetensors"], "LLAMA2", tmp_path / "torchtune", state_dict)
    their_tensors = _tensors(theirs)  # torchtune puts the adapter beside the weights; we put it in adapter/
    their_adapter = {k: their_tensors.pop(k) for k in [k for k in their_tensors if ".lora_" in k]}
    _assert_bitwise(_tensors(saved / ADAPTER_DIR), their_adapter)
    _assert_bitwise(_tensors(saved), their_tensors)


def test_pickled_weights_named_in_checkpoint_files_are_refused_by_name(llama2_base, tmp_path):
    base, first, _ = llama2_base
    torch.save(first, base / "llama2_hf_checkpoint_01.pt")
    (base / "pytorch_model.bin").write_bytes((base / "llama2_hf_checkpoint_01.pt").read_bytes())
    for name in ("llama2_hf_checkpoint_01.pt", "pytorch_model.bin"):
        with pytest.raises(CheckpointFormatError, match=rf"{name}: .*weights are read from safetensors only"):
            DistributedHFCheckpointer(base, tmp_path / "out", "LLAMA2", checkpoint_files=[base / name]).load_checkpoint()


def test_mistral_reward_model_single_file(tmp_path):
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), **_layer(0, rotary=False), "model.norm.weight": (DIM,), "score.weight": (1, DIM)}
    tensors = _random(shapes | {"score.bias": (1, DIM)}, 18)  # a bias some conversions carry: not part of the model
    config = {"hidden_size": DIM, "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "num_classes": 1}
    base = _write_base(tmp_path / "checkpoint_dir", {"model.safetensors": tensors}, config, index=False)
    ours = DistributedHFCheckpointer(base, tmp_path / "output_dir", "REWARD")
    state_dict = ours.load_checkpoint()
    assert len(state_dict["model"]) == len(tensors) - 1
    dims = {"num_layers": 1, "num_heads": HEADS, "num_kv_heads": HEADS, "embed_dim": DIM, "intermediate_dim": HIDDEN, "max_seq_len": 128}
    mistral.mistral_classifier(num_classes=1, vocab_size=VOCAB, **dims).load_state_dict(state_dict["model"])
    saved = Path(ours.save_checkpoint(state_dict, epoch=1))
    theirs = _torchtune_save(base, ["model.safetensors"], "REWARD", tmp_path / "torchtune", state_dict)
    _assert_bitwise(_tensors(saved), _tensors(theirs))
    assert len(_tensors(saved)) == len(tensors) - 1


def test_gemma_single_file_tied_embeddings(tmp_path):
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), **_layer(0, kv_rows=HEAD_DIM, q_rows=HEADS * HEAD_DIM, rotary=False), "model.norm.weight": (DIM,)}
    tensors = _random(shapes, 19)
    config = {"hidden_size": DIM, "num_attention_heads": HEADS, "num_key_value_heads": 1, "head_dim": HEAD_DIM, "intermediate_size": HIDDEN}
    base = _write_base(tmp_path / "checkpoint_dir", {"model.safetensors": tensors}, config, index=False)
    ours = DistributedHFCheckpointer(base, tmp_path / "output_dir", "GEMMA")
    state_dict = ours.load_checkpoint()
    assert len(state_dict["model"]) == len(tensors)  # no lm_head: tied to the embeddings
    dims = {"num_layers": 1, "num_heads": HEADS, "head_dim": HEAD_DIM, "num_kv_heads": 1, "embed_dim": DIM, "intermediate_dim": HIDDEN}
    gemma.gemma(vocab_size=VOCAB, max_seq_len=128, **dims).load_state_dict(state_dict["model"])
    saved = Path(ours.save_checkpoint(state_dict, epoch=1))
    theirs = _torchtune_save(base, ["model.safetensors"], "GEMMA", tmp_path / "torchtune", state_dict)
    _assert_bitwise(_tensors(saved), _tensors(theirs))


def test_an_unreachable_hub_names_the_url_and_the_endpoint(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from checkpointer.testing.multiprocess import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    checkpointer = DistributedHFCheckpointer("hf://some-org/some-model", tmp_path / "out", "LLAMA3")
    with pytest.raises(CheckpointError, match=rf"hf://some-org/some-model: the Hub at {endpoint} could not be reached after retries"):
        checkpointer.load_checkpoint()
