"""Faults from outside: the Hub answering 5xx, resetting connections, answering slowly."""

from __future__ import annotations

import hashlib
import random
import re
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from places import unique_repo, upload_to_hub
from safetensors.torch import load_file
from states import differences

from checkpointer import CheckpointError, DistributedHFCheckpointer
from checkpointer.train.builders import build_model_from_dir

pytestmark = pytest.mark.usefixtures("private_cache")


def _upload(folder: Path) -> str:
    repo = unique_repo("faults")
    upload_to_hub(folder, repo)
    return repo


def _weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("fault", [{"status": 503}, {"reset": True}, {"delay": 1.5}])
def test_loads_survive_transient_hub_faults(hub_env, tiny_models, streaming, fault):
    base = tiny_models["llama3"]
    repo = _upload(base)
    reference = DistributedHFCheckpointer(base, "/tmp/unused", "LLAMA3").load_checkpoint()["model"]
    hub_env.inject_fault("GET", rf"^/{re.escape(repo)}/resolve/.*safetensors", times=2, **fault)
    loaded = DistributedHFCheckpointer(f"hf://{repo}", "/tmp/unused", "LLAMA3", streaming=streaming).load_checkpoint()["model"]
    assert not differences(loaded, reference)


def test_a_load_that_keeps_failing_is_a_clear_error(hub_env, tiny_models):
    repo = _upload(tiny_models["llama2"])
    hub_env.inject_fault("GET", rf"^/{re.escape(repo)}/resolve/.*safetensors", status=500, times=100)
    with pytest.raises(CheckpointError, match=repo):
        DistributedHFCheckpointer(f"hf://{repo}", "/tmp/unused", "LLAMA2", streaming=True).load_checkpoint()


def _random_fault(rng: random.Random, repo: str) -> tuple[str | None, dict]:
    """(path regex, fault) for one push: none, transient (503, reset, slow) or hard (500 x 50)."""
    commit = rf"^/api/models/{re.escape(repo)}/commit/"
    choices = [
        (None, {}),
        (commit, {"status": 503}),
        (commit, {"reset": True}),
        (commit, {"delay": 0.5}),
        (rf"^/api/models/{re.escape(repo)}/preupload/", {"delay": 0.5}),
        (commit, {"status": 500, "times": 50}),
    ]
    return choices[rng.randrange(len(choices))]


def _must_land(fault: dict) -> bool | None:
    """Whether a push with ``fault`` must land (True), must fail (False), or may do either (a transient error)."""
    if not fault or set(fault) == {"delay"}:
        return True
    return False if fault.get("times", 1) > 1 else None


@pytest.mark.soak
def test_soak_50_pushes_with_random_faults_lose_nothing(hub_env, tiny_models):
    """Every push either lands whole (and downloads bitwise) or leaves the repo exactly as it was."""
    from huggingface_hub import hf_hub_download

    base = tiny_models["llama2"]
    repo = unique_repo("soak")
    model = build_model_from_dir("LLAMA2", base)
    checkpointer = DistributedHFCheckpointer(base, f"hf://{repo}", "LLAMA2")
    checkpointer.load_model(model)
    rng, landed, wrong = random.Random(0), [], []
    for step in range(1, 51):
        with torch.no_grad():
            model.norm.scale.add_(0.01)
        expected = _weights(model.state_dict())
        before = hub_env.commits(repo) if step > 1 else []
        path, fault = _random_fault(rng, repo)
        if path:
            hub_env.inject_fault("POST", path, **{"times": 1, **fault})
        try:
            published = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0, step=step)
        except CheckpointError:
            assert hub_env.commits(repo) == before  # nothing half-pushed
            wrong += [(step, fault, "failed")] if _must_land(fault) else []
            continue
        finally:
            hub_env.clear_faults()
        wrong += [(step, fault, "landed")] if _must_land(fault) is False else []
        landed.append(step)
        assert published == f"hf://{repo}@step-{step}"
        assert sum(c["title"].startswith("checkpointer:") for c in hub_env.commits(repo)) == len(landed)  # one commit per push
        file = hf_hub_download(repo, "model.safetensors", revision=f"step-{step}")
        saved = load_file(file)
        assert torch.equal(saved["model.norm.weight"], expected["norm.scale"])
    assert not wrong, wrong  # no fault-free push failed, no push against a hard fault landed
    tags = {t.name for t in HfApi().list_repo_refs(repo).tags}
    assert tags == {f"step-{step}" for step in landed}  # exactly the pushes that landed are visible
    assert 0 < len(landed) < 50


def test_a_download_corrupted_in_transit_is_caught_and_dropped_from_the_cache(hub_env, tiny_models):
    """The Hub reports each file's digest; a download that does not match it never loads."""
    repo = _upload(tiny_models["llama2"])
    data = hub_env.file_bytes(repo, "model.safetensors")
    reported = {s.rfilename: s.blob_id for s in HfApi().repo_info(repo, files_metadata=True).siblings}
    assert reported["model.safetensors"] == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # the Hub has settled on the good digest
    corrupt = bytearray(data)
    corrupt[-1] ^= 0x01  # one bit of the last weight, behind the Hub's back (its reported digest stays)
    hub_env.store._blobs[hashlib.sha256(data).hexdigest()] = bytes(corrupt)
    with pytest.raises(CheckpointError, match=r"model.safetensors: downloaded bytes hash to .* but the Hub reports") as e:
        DistributedHFCheckpointer(f"hf://{repo}", "/tmp/unused", "LLAMA2").load_checkpoint()
    assert "the cached copy was removed" in str(e.value)


def _s3_checkpoint(s3, base: Path) -> str:
    fs = s3.filesystem()
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(str(base), f"{bucket}/base", recursive=True)
    return bucket


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("fault", [{"status": 503}, {"reset": True}, {"delay": 1.5}])
def test_loads_survive_transient_s3_faults(s3_env, tiny_models, streaming, fault):
    base = tiny_models["qwen2_tied"]
    bucket = _s3_checkpoint(s3_env, base)
    reference = DistributedHFCheckpointer(base, "/tmp/unused", "QWEN2").load_checkpoint()["model"]
    s3_env.inject_fault("GET", rf"^/{bucket}/base/.*safetensors", times=2, **fault)
    options = {"storage_options": s3_env.storage_options}
    loaded = DistributedHFCheckpointer(f"s3://{bucket}/base", "/tmp/unused", "QWEN2", streaming=streaming, **options).load_checkpoint()["model"]
    assert not differences(loaded, reference)


def test_s3_pushes_retry_transient_faults_and_a_hard_failure_is_never_visible(s3_env, tiny_models):
    base = tiny_models["qwen2_tied"]
    bucket = _s3_checkpoint(s3_env, base)
    model = build_model_from_dir("QWEN2", base)
    checkpointer = DistributedHFCheckpointer(base, f"s3://{bucket}/runs", "QWEN2", storage_options=s3_env.storage_options)
    checkpointer.load_model(model)
    s3_env.inject_fault("PUT", rf"^/{bucket}/runs/epoch_0/", status=503, times=2)
    s3_env.inject_fault("PUT", rf"^/{bucket}/runs/epoch_0/", reset=True, times=1)
    assert checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0) == f"s3://{bucket}/runs/epoch_0"
    s3_env.inject_fault("PUT", rf"^/{bucket}/runs/epoch_1/", status=500, times=1000)
    with pytest.raises(CheckpointError, match="the complete checkpoint is kept at"):
        checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1)
    s3_env.clear_faults()
    assert [m["name"] for m in checkpointer.published_checkpoints()] == ["epoch_0"]  # epoch_1 never looks complete
    fs = s3_env.filesystem()
    assert not fs.exists(f"{bucket}/runs/epoch_1/checkpointer.json")
