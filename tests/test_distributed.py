"""FSDP2 over 2 and 3 real processes (gloo): sharded load, save and reload against transformers."""

from __future__ import annotations

import shutil

import pytest
from dist_workers import case, load_expecting_errors, load_forward_save_reload
from variants import TOKENS, TOLERANCE, VARIANTS, assert_same_tensors, hf_logits

from checkpointer.testing.multiprocess import run_on_ranks


@pytest.fixture(scope="module")
def references(tiny_models):
    return {name: hf_logits(path) for name, path in tiny_models.items()}


@pytest.mark.parametrize("world", [2, 3])
def test_every_model_type_loads_and_saves_sharded(world, tiny_models, references, tmp_path):
    cases = [case(name, VARIANTS[name].model_type, tiny_models[name], tmp_path / name) for name in VARIANTS]
    results = run_on_ranks(load_forward_save_reload, world, cases, TOKENS, timeout=600)
    for name in VARIANTS:
        per_rank = [r[name] for r in results]
        for rank, result in enumerate(per_rank):
            diff = (result["logits"] - references[name]).abs().max().item()
            assert diff <= TOLERANCE, f"{name} rank {rank}: logits differ by {diff}"
            assert result["bitwise"], f"{name} rank {rank}: save then load is not bitwise equal"
        base_bytes = sum(p.stat().st_size for p in tiny_models[name].glob("*.safetensors"))
        read = sum(r["bytes_read"] for r in per_rank)
        written = sum(r["bytes_written"] for r in per_rank)
        assert read == written, f"{name}: ranks read {read} bytes but wrote {written}"
        assert read <= base_bytes and all(r["bytes_read"] < read for r in per_rank)  # each rank read only its share
        saved = per_rank[0]["saved"]
        assert all(r["saved"] == saved for r in per_rank)
        assert (hf_logits(saved) - references[name]).abs().max() <= TOLERANCE, name
        assert_same_tensors(tiny_models[name], saved)


def _second_shard(folder) -> str:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))[1]


def _broken_copies(tiny_models, tmp_path) -> list[dict]:
    """Cases of broken checkpoints; the model is built from the config of the last folder named."""
    sharded = tiny_models["llama3"]  # has an index and several files

    def copy(name):
        target = tmp_path / name
        shutil.copytree(sharded, target)
        return target

    stray = copy("stray")
    shutil.copy(tiny_models["qwen2_tied"] / "model.safetensors", stray / "model-99999-of-99999.safetensors")
    missing = copy("missing_shard")
    (missing / _second_shard(sharded)).unlink()
    out = tmp_path / "out"
    return [
        case("stray_file_ignored", "LLAMA3", stray, out, sharded),
        case("missing_shard", "LLAMA3", missing, out, sharded),
        case("shape_mismatch", "LLAMA3", sharded, out, tiny_models["llama2"]),
        case("wrong_model_type", "QWEN2", sharded, out, tiny_models["qwen2_untied"]),
    ]


def test_bad_inputs_raise_the_same_clear_error_on_every_rank(tiny_models, tmp_path):
    cases = _broken_copies(tiny_models, tmp_path)
    removed = _second_shard(tiny_models["llama3"])
    results = run_on_ranks(load_expecting_errors, 2, cases, timeout=300)
    assert results[0]["stray_file_ignored"] == results[1]["stray_file_ignored"] == "no error"
    for rank, messages in enumerate(results):
        assert removed in messages["missing_shard"] and "missing" in messages["missing_shard"]
        assert "shape mismatch" in messages["shape_mismatch"]
        assert "layers.0.attn.k_proj.weight has shape (64, 64) in the model but model.layers.0.self_attn.k_proj.weight" in messages["shape_mismatch"]
        assert "has (32, 64)" in messages["shape_mismatch"]
        assert "unexpected key" in messages["wrong_model_type"] or "missing key" in messages["wrong_model_type"]
    for name in ("missing_shard", "shape_mismatch", "wrong_model_type"):
        assert results[0][name] == results[1][name], name
