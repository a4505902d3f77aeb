"""Tensor parallel, FSDP2 over TP, HSDP, a 3-D mesh and strided shards on 4 real processes; uneven TP on 3 (gloo).

Every layout is loaded from a transformers-written checkpoint and compared, tensor by
tensor, with torchtune 0.6.1's own ``hf_to_tune`` of that checkpoint; each rank must read
exactly the bytes torch says it holds; the save must hold every byte once (transformers
gives the same logits as for the base) and its digests verify (a tensor-parallel column box is
one strided digest); loading that save and saving again gives the same bytes.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from parallel_workers import layout, load_save_load_save, strided_round_trip
from safetensors.torch import load_file
from variants import hf_logits

from checkpointer.cli import main as cli_main
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.testing.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("parallel")
    return {
        "llama3": tiny_models["llama3"],  # 4 heads, 2 kv heads: with tp 2 x dp 2 each rank holds half a kv head
        "llama3_kv4": write_tiny_model("LLAMA3", root / "llama3_kv4", num_key_value_heads=4, max_shard_size="30KB"),
        "nine_heads": tiny_models["llama3_2_9_heads"],  # tp 3: intermediate 128 and the vocabulary split unevenly
    }


def _payload(folder: pathlib.Path) -> int:
    """The tensor bytes of a folder's safetensors files: each file less its 8-byte length and JSON header."""
    sizes = [(f.stat().st_size, int.from_bytes(f.read_bytes()[:8], "little")) for f in folder.glob("*.safetensors")]
    return sum(size - 8 - header for size, header in sizes)


def _check(name: str, base, per_rank: list[dict]) -> None:
    for rank, result in enumerate(per_rank):
        assert not result["missing"], f"{name} rank {rank}: keys torchtune converts but the model lacks: {result['missing']}"
        assert not result["mismatched"], f"{name} rank {rank}: not bitwise equal to torchtune's hf_to_tune: {result['mismatched']}"
        assert result["bytes_read"] == result["local_bytes"], f"{name} rank {rank}: read {result['bytes_read']}, holds {result['local_bytes']}"
    saved, resaved = pathlib.Path(per_rank[0]["saved"]), pathlib.Path(per_rank[0]["resaved"])
    assert sum(r["bytes_written"] for r in per_rank) == _payload(saved), f"{name}: not every byte written exactly once"
    files = sorted(p.name for p in saved.glob("*.safetensors")) + ["model.safetensors.index.json"]
    for file in files:
        if (saved / file).exists() or (resaved / file).exists():
            assert (saved / file).read_bytes() == (resaved / file).read_bytes(), f"{name}: save, load, save changed {file}"
    assert (hf_logits(saved) == hf_logits(base)).all(), f"{name}: transformers' logits of the save differ from the base's"
    assert cli_main(["verify", str(saved), "--full"]) == 0, f"{name}: the digests of the boxes the ranks wrote do not verify"


def test_tensor_parallel_fsdp_over_tp_hsdp_and_3d_on_4_ranks(bases, tmp_path, capsys):
    layouts = [
        layout("fsdp_over_tp", "LLAMA3", bases["llama3"], tmp_path / "fsdp_over_tp", tp=2),
        layout("tp", "LLAMA3", bases["llama3_kv4"], tmp_path / "tp", tp=4),
        layout("hsdp", "LLAMA3", bases["llama3"], tmp_path / "hsdp", replicate=2),
        layout("replicate_x_tp", "LLAMA3", bases["llama3"], tmp_path / "replicate_x_tp", tp=2, replicate=2),
    ]
    results = run_on_ranks(load_save_load_save, 4, layouts, timeout=900, pg_timeout=300)
    placements = results[0]["fsdp_over_tp"]["placements"]
    assert "_StridedShard" in placements["layers.0.attn.k_proj.weight"] and "Shard(dim=1)" in placements["layers.0.attn.output_proj.weight"]
    assert "Replicate()" in results[0]["hsdp"]["placements"]["layers.0.attn.q_proj.weight"]
    assert len(results[0]["replicate_x_tp"]["placements"]["layers.0.mlp.w2.weight"].split(",")) == 3
    for c in layouts:
        base = bases["llama3_kv4"] if c["name"] == "tp" else bases["llama3"]
        _check(c["name"], base, [r[c["name"]] for r in results])
    _check_column_digests(pathlib.Path(results[0]["tp"]["saved"]), results[0]["tp"]["placements"], tmp_path / "corrupt", capsys)


def _check_column_digests(saved: pathlib.Path, placements: dict[str, str], corrupt: pathlib.Path, capsys) -> None:
    """Each rank's column box is one strided digest whatever its rows, and a byte changed in one of its rows is found."""
    files = json.loads((saved / MANIFEST_FILE).read_text())["files"]
    strided = {name: [r for r in files[name]["xxh3_128"] if len(r) == 5] for name in files if name.endswith(".safetensors")}
    columns = [k for k, p in placements.items() if "Shard(dim=1)" in p]
    assert columns and sum(len(r) for r in strided.values()) == 4 * len(columns)  # TP 4: one per rank and column tensor
    shutil.copytree(saved, corrupt)
    name, (offset, length, stride, count, _) = next((n, r[0]) for n, r in strided.items() if r)
    victim = corrupt / name
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[offset + (count // 2) * stride + length - 1] ^= 0x01  # the last byte of this box in its middle row
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["verify", str(corrupt), "--full"]) == 1
    out = capsys.readouterr().out
    assert f"{name}: xxh3_128 " in out and f"of {count} runs of {length} bytes, {stride} apart" in out, out


def test_uneven_tensor_parallel_on_3_ranks(bases, tmp_path):
    layouts = [layout("tp3", "LLAMA3_2", bases["nine_heads"], tmp_path / "tp3", tp=3)]
    results = run_on_ranks(load_save_load_save, 3, layouts, timeout=600, pg_timeout=300)
    assert len({r["tp3"]["local_bytes"] for r in results}) > 1  # the shards really are uneven
    _check("tp3", bases["nine_heads"], [r["tp3"] for r in results])


def test_strided_shards_whose_rows_are_not_consecutive_load_and_save(bases, tmp_path):
    results = run_on_ranks(strided_round_trip, 4, str(bases["llama3"]), str(tmp_path / "out"), timeout=600, pg_timeout=300)
    assert all(r["boxes"] > 1 for r in results)  # several boxes per rank: the general path
    assert not any(r["mismatched"] for r in results), results[0]["mismatched"]
    saved = {k: v for f in pathlib.Path(results[0]["saved"]).glob("*.safetensors") for k, v in load_file(f).items()}
    base = {k: v for f in bases["llama3"].glob("*.safetensors") for k, v in load_file(f).items()}
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
