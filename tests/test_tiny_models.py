"""The tiny checkpoint writer: sharding, determinism, tokenizer, overrides."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from states import differences

from checkpointer.format.model_config import ModelConfig
from checkpointer.testing.tiny_models import TINY_VOCAB_SIZE, tiny_vocab, write_tiny_model

transformers = pytest.importorskip("transformers")


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return {k: t for f in sorted(path.glob("*.safetensors")) for k, t in load_file(f).items()}


def test_small_shards_give_an_index_naming_every_file(tmp_path: pathlib.Path) -> None:
    path = write_tiny_model("LLAMA3", tmp_path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = {p.name for p in path.glob("*.safetensors")}
    assert len(files) > 1 and set(index["weight_map"].values()) == files
    assert set(index["weight_map"]) == set(_weights(path))
    assert (path / "generation_config.json").exists()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: pathlib.Path) -> None:
    a, b, c = (write_tiny_model("QWEN2", tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert not differences(wa, wb)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_norms_and_biases_are_not_constant(tmp_path: pathlib.Path) -> None:
    weights = _weights(write_tiny_model("QWEN2", tmp_path))
    one_d = [t for k, t in weights.items() if t.ndim == 1]
    assert one_d and all(t.std() > 0.05 for t in one_d)


def test_overrides_tied_and_dtype_reach_the_config(tmp_path: pathlib.Path) -> None:
    path = write_tiny_model(
        "LLAMA3_2", tmp_path, tied=False, dtype=torch.bfloat16, num_attention_heads=9, num_key_value_heads=3,
        hidden_size=72,
    )  # fmt: skip
    config = ModelConfig.from_json((path / "config.json").read_text())
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 8)
    assert not config.tie_word_embeddings and config.dtype == torch.bfloat16
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
    assert {t.dtype for t in _weights(path).values()} == {torch.bfloat16}


@pytest.mark.parametrize("model_type", ["LLAMA3", "QWEN2", "PHI3_MINI"])  # generic and model-specific classes
def test_auto_tokenizer_loads_and_round_trips(model_type: str, tmp_path: pathlib.Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(write_tiny_model(model_type, tmp_path))
    ids = tok("<s>Hello, world!")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and max(ids) < TINY_VOCAB_SIZE
    assert tok.decode(ids) == "<s>Hello, world!"
    assert len(tok) == TINY_VOCAB_SIZE and (tok.pad_token_id, tok.eos_token_id) == (0, 2)


def test_vocab_has_exactly_the_asked_size() -> None:
    for size in (4, 50, 128, 300):
        vocab = tiny_vocab(size)
        assert len(vocab) == size and sorted(vocab.values()) == list(range(size))
    with pytest.raises(ValueError):
        tiny_vocab(3)


def test_unknown_model_type_is_named(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="GPT2"):
        write_tiny_model("GPT2", tmp_path)
