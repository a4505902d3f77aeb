"""Async save: the loop waits only for a copy of its own shards; writing and publishing overlap training."""

from __future__ import annotations

import pytest
import torch
from async_workers import background_error_surfaces, save_in_background_while_training, stage_shards_of_a_gpu_mesh

from checkpointer import DistributedHFCheckpointer
from checkpointer.testing.multiprocess import run_on_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ON_A_GPU = pytest.param("cuda", marks=pytest.mark.skipif(not GPUS, reason="needs a GPU: bench/device.sh runs it on one"))
BACKENDS = {"cpu": (2, "gloo"), "cuda": (min(GPUS, 2), "cuda:nccl,cpu:gloo")}  # ranks, and the process group's backend


@pytest.mark.parametrize("device", ["cpu", ON_A_GPU])
def test_async_saves_hold_the_weights_of_the_moment_they_were_called(tiny_models, tmp_path, device):
    """On a GPU this also loads into the GPU's shards, stages them into pinned buffers and writes them from there."""
    base, out, (world, backend) = tiny_models["qwen2_untied"], tmp_path / "out", BACKENDS[device]
    results = run_on_ranks(save_in_background_while_training, world, str(base), str(out), "QWEN2", device, timeout=300, backend=backend)
    assert results[0]["paths"] == [str(out / f"epoch_{epoch}") for epoch in range(3)]
    original = DistributedHFCheckpointer(base, tmp_path / "x", "QWEN2").load_checkpoint()["model"]
    saved = [
        DistributedHFCheckpointer(out / f"epoch_{epoch}", tmp_path / "x", "QWEN2", verify_checksums=True).load_checkpoint()["model"]
        for epoch in range(3)
    ]
    for key, value in original.items():
        assert torch.equal(saved[0][key], value), key  # not the weights changed after the call returned
        assert torch.equal(saved[1][key], value * 2), key
        assert torch.equal(saved[2][key], value * 6), key  # the plain save after them
    assert all(r["blocked"] < r["full"] for r in results)


def test_a_background_failure_is_raised_by_the_next_save_on_every_rank(tiny_models, tmp_path):
    messages = run_on_ranks(background_error_surfaces, 2, str(tiny_models["llama2"]), str(tmp_path / "out"), "LLAMA2", timeout=180)
    assert all("failpoint save:write on rank 1" in m for m in messages), messages
    assert not (tmp_path / "out" / "epoch_0").exists()


def test_staged_gpu_shards_stay_in_their_host_buffers_and_follow_every_later_save():
    results = run_on_ranks(stage_shards_of_a_gpu_mesh, 2, timeout=120)
    for rank, r in enumerate(results):
        expected = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
        assert torch.equal(r["first"], expected) and torch.equal(r["second"], expected * 2) and torch.equal(r["source"], expected * 2)
        assert r["same_buffer"]  # reused, and not the source's memory
        assert r["layout"] == ("cuda", (4, 3), "(Shard(dim=0),)")
