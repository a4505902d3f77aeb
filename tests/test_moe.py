"""Mixture-of-experts models (QWEN3_MOE, MIXTRAL) against transformers: routing, aux loss, layouts, bad files.

Logits, round trips and sharded loads at 1, 2 and 3 ranks run in test_checkpointer.py and
test_distributed.py over the ``qwen3_moe``, ``mixtral`` and ``qwen3_moe_fused`` variants.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_workers import case, load_expecting_errors
from safetensors.torch import load_file, save_file
from variants import TOKENS

from checkpointer import DistributedHFCheckpointer
from checkpointer.format.model_config import ModelConfig
from checkpointer.mapping.key_maps import get_key_map
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.train.builders import build_model_from_dir
from checkpointer.train.moe import router_aux_loss


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_router_aux_loss_equals_transformers(name, tiny_models, tmp_path):
    base = tiny_models[name]
    model_type = "QWEN3_MOE" if name == "qwen3_moe" else "MIXTRAL"
    model = build_model_from_dir(model_type, base)
    DistributedHFCheckpointer(base, tmp_path, model_type).load_model(model)
    with torch.no_grad():
        model(TOKENS)
        reference = _hf(base)(TOKENS, output_router_logits=True).aux_loss
    ours = router_aux_loss(model)
    assert ours is not None and reference is not None
    assert abs(ours.item() - reference.item()) <= 1e-5 * max(1.0, reference.item())


def test_expert_shards_are_whole_experts_each_read_once(tiny_models, tmp_path):
    """The load plan of an [E, F, D] tensor names each expert's own HF tensor, whole, once."""
    from checkpointer.format.folder import LocalFolder
    from checkpointer.format.hf_files import read_checkpoint_files
    from checkpointer.mapping.local_shards import LocalShard
    from checkpointer.mapping.matching import match_for_load
    from checkpointer.mapping.pieces import shard_pieces

    base = tiny_models["mixtral"]
    config = ModelConfig.from_json((base / "config.json").read_text())
    key_map = get_key_map("MIXTRAL", config)
    tensors = read_checkpoint_files(LocalFolder(base)).tensors
    model = build_model_from_dir("MIXTRAL", base)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sources = match_for_load(key_map, shapes, tensors, str(base))
    key = "layers.1.mlp.experts.up_proj"
    local = torch.empty(3, *shapes[key][1:])  # experts 3, 4, 5: rank 1 of 3 over 8 experts
    pieces = shard_pieces(key_map, sources[key], LocalShard(local, (3, 0, 0), shapes[key]))
    assert [p.hf_key for p in pieces] == [f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight" for e in (3, 4, 5)]
    assert all(p.offsets == (0, 0) and p.lengths == tensors[p.hf_key].shape for p in pieces)
    assert all(p.view.data_ptr() == local[i].data_ptr() for i, p in enumerate(pieces))


def test_fused_checkpoint_has_the_same_weights_as_per_expert(tiny_models, tmp_path):
    """The fused fixture (transformers' in-memory layout) and save_pretrained's per-expert files hold one model."""
    fused, per_expert = tiny_models["qwen3_moe_fused"], tiny_models["qwen3_moe"]
    fused_keys = json.loads((fused / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused_keys
    assert not any(".experts.0." in k for k in fused_keys)
    states = []
    for base in (fused, per_expert):
        checkpointer = DistributedHFCheckpointer(base, tmp_path / base.name, "QWEN3_MOE")
        states.append(checkpointer.load_checkpoint()["model"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def _rewrite(folder: Path, change) -> None:
    """Rewrite the single weights file with ``change(tensors)`` applied (safetensors' own writer)."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _set_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))


def _broken_moe_copies(tiny_models, tmp_path) -> list[dict]:
    mixtral = tiny_models["mixtral"]
    missing = _copy(mixtral, tmp_path / "missing_expert")
    _rewrite(missing, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.5.w3.weight"))
    router = _copy(mixtral, tmp_path / "router_shape")
    _rewrite(router, lambda t: t.update({"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(7, 64)}))
    more = _copy(mixtral, tmp_path / "config_more_experts")
    _set_config(more, num_local_experts=10)
    fewer = _copy(mixtral, tmp_path / "config_fewer_experts")
    _set_config(fewer, num_local_experts=6)
    fused = _copy(tiny_models["qwen3_moe_fused"], tmp_path / "fused_fewer_experts")
    _set_config(fused, num_experts=6)
    out = tmp_path / "out"
    return [
        case("missing_expert", "MIXTRAL", missing, out),
        case("router_shape", "MIXTRAL", router, out),
        case("config_more_experts", "MIXTRAL", more, out),
        case("config_fewer_experts", "MIXTRAL", fewer, out),
        case("fused_fewer_experts", "QWEN3_MOE", fused, out),
    ]


EXPECTED = {
    "missing_expert": "missing key: layers.1.mlp.experts.up_proj (stored as model.layers.1.block_sparse_moe.experts.5.w3.weight)",
    "router_shape": "layers.0.mlp.router.weight has shape (8, 64) in the model but model.layers.0.block_sparse_moe.gate.weight",
    "config_more_experts": "missing key: layers.0.mlp.experts.gate_proj (stored as model.layers.0.block_sparse_moe.experts.8.w1.weight)",
    "config_fewer_experts": "unexpected key: model.layers.0.block_sparse_moe.experts.6.w1.weight",
    "fused_fewer_experts": "layers.0.mlp.experts.gate_proj has shape (6, 32, 64) in the model but model.layers.0.mlp.experts.gate_up_proj",
}


def test_bad_moe_checkpoints_are_refused_on_every_rank_naming_the_key(tiny_models, tmp_path):
    results = run_on_ranks(load_expecting_errors, 2, _broken_moe_copies(tiny_models, tmp_path), timeout=300)
    for name, expected in EXPECTED.items():
        assert results[0][name] == results[1][name], name
        assert results[0][name].startswith("CheckpointMismatchError"), results[0][name]
        assert expected in results[0][name], results[0][name]
    assert "num_experts in config.json" in results[0]["config_more_experts"]
    assert "has 6 experts" in results[0]["config_fewer_experts"]
    assert "(8, 64, 64)" in results[0]["fused_fewer_experts"]  # the file's 8 experts


@pytest.mark.parametrize(
    "offsets,lengths",
    [((0, 0, 0), (4, 6, 3)), ((2, 0, 0), (1, 6, 3)), ((2, 1, 0), (1, 2, 3)), ((1, 0, 0), (2, 6, 3)), ((3, 5, 1), (1, 1, 2)),
     ((1, 1, 0), (2, 2, 3)), ((1, 0, 1), (1, 6, 2)), ((0, 2, 0), (2, 6 - 2, 3))],
)  # fmt: skip
def test_contiguous_box_is_exactly_the_boxes_whose_elements_are_one_run(offsets, lengths):
    """The reader and writer move a box as one byte run only when its elements are consecutive in the file."""
    from checkpointer.format.safetensors import TensorEntry

    shape, start = (4, 6, 3), 100
    entry = TensorEntry("t", "f", torch.float32, shape, start, start + 4 * 6 * 3 * 4)
    index = torch.arange(4 * 6 * 3).view(shape)
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        index = index.narrow(dim, o, n)
    flat = index.flatten()
    consecutive = bool((flat.diff() == 1).all())
    expected = start + int(flat[0]) * 4 if consecutive else None
    assert entry.contiguous_box(offsets, lengths) == expected
