"""Loading from and publishing to the Hub (a local Hub server), S3 (moto's server) and memory://."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from dist_workers import case, load_forward_save_reload, load_only
from places import KINDS, place, unique_repo, upload_to_hub
from saves import save_steps
from states import differences
from variants import TOKENS, TOLERANCE, hf_logits

from checkpointer import CheckpointError, DistributedHFCheckpointer
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.phases import fetch_folder
from checkpointer.storage.location import PublishOptions
from checkpointer.storage.urls import FsspecUrl, HubUrl, LocalPath, parse_location
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.train.builders import build_model_from_dir

pytestmark = pytest.mark.usefixtures("private_cache")


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ---- URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        ("/data/llama", LocalPath(Path("/data/llama"))),
        ("runs/x", LocalPath(Path("runs/x"))),
        ("hf://meta-llama/Llama-3.2-1B", HubUrl("meta-llama/Llama-3.2-1B")),
        ("hf://ns/repo@v1.0/sub/dir", HubUrl("ns/repo", "model", "v1.0", "sub/dir")),
        ("hf://datasets/ns/repo@exp%2F1", HubUrl("ns/repo", "dataset", "exp/1")),
        ("memory://bases/q", FsspecUrl("memory", "memory://bases/q")),
        ("s3://bucket/prefix/", FsspecUrl("s3", "s3://bucket/prefix")),
    ],
)
def test_locations_parse(value, expected):
    assert parse_location(value) == expected


@pytest.mark.parametrize(
    "value,message",
    [
        ("s3:/bucket/x", "did you mean s3://"),
        ("hf://justaname", r"expected hf://\[datasets/\]namespace/repo"),
        ("hf://ns/repo@", "empty revision"),
        ("hf://ns/re po", "not a valid repo"),
        ("hf://ns/repo/../x", "not a clean relative path"),
        ("nosuchproto://x/y", "fsspec knows no protocol 'nosuchproto'"),
        ("s3://", "no bucket or path"),
        ("", "empty"),
    ],
)
def test_bad_locations_are_refused_before_any_work(value, message):
    with pytest.raises(CheckpointError, match=message) as info:
        DistributedHFCheckpointer(value, "/tmp/out", "LLAMA3")
    assert "checkpoint_dir" in str(info.value)


def test_hub_url_round_trips_through_str():
    url = HubUrl("ns/repo", "dataset", "exp/1", "a/b")
    assert parse_location(str(url)) == url


# ---- memory:// (one process: the memory file system lives in this process) ------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_memory_round_trip(tiny_models, tmp_path, streaming):
    base = tiny_models["qwen2_untied"]
    fs = fsspec.filesystem("memory")
    root = f"/bases/{uuid.uuid4().hex[:8]}"
    fs.put(str(base), root, recursive=True)
    out = f"memory://runs/{uuid.uuid4().hex[:8]}"
    model = build_model_from_dir("QWEN2", base)
    checkpointer = DistributedHFCheckpointer(f"memory:/{root}", out, "QWEN2", streaming=streaming)
    checkpointer.load_model(model)
    reference = hf_logits(base)
    with torch.no_grad():
        assert (model(TOKENS) - reference).abs().max() <= TOLERANCE
    saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    assert saved == f"{out}/epoch_0"
    local = tmp_path / "downloaded"
    fs.get(saved.removeprefix("memory:/"), str(local), recursive=True)
    assert (hf_logits(local) - reference).abs().max() <= TOLERANCE
    assert not list((tmp_path / "cache" / "staging").rglob("*.safetensors"))  # staging removed after upload


# ---- the Hub ----------------------------------------------------------------------------------


def test_hub_load_by_branch_and_sha_on_two_ranks_then_push_one_commit(hub_env, tiny_models):
    from huggingface_hub import HfApi, snapshot_download

    base = tiny_models["llama3"]
    repo = unique_repo("tiny-llama")
    sha = upload_to_hub(base, repo)
    HfApi().create_branch(repo, branch="exp/1")
    outs = {"branch": unique_repo("out-branch"), "sha": unique_repo("out-sha")}
    cases = [
        case("branch", "LLAMA3", f"hf://{repo}@exp%2F1", f"hf://{outs['branch']}", base),
        case("sha", "LLAMA3", f"hf://{repo}@{sha}", f"hf://{outs['sha']}", base),
    ]
    results = run_on_ranks(load_forward_save_reload, 2, cases, TOKENS, timeout=300)
    reference = hf_logits(base)
    for name, out in outs.items():
        for rank in (0, 1):
            assert (results[rank][name]["logits"] - reference).abs().max() <= TOLERANCE
            assert results[rank][name]["bitwise"]
            assert results[rank][name]["saved"] == f"hf://{out}@epoch-0"
        commits = hub_env.commits(out)
        assert len(commits) == 2  # the repo's initial commit and exactly one checkpoint commit
        expected = {p.name for p in base.iterdir()} | {"README.md", MANIFEST_FILE}
        assert set(commits[0]["files_changed"]) == expected
        assert "epoch-0" in {t.name for t in HfApi().list_repo_refs(out).tags}
        assert HfApi().repo_info(out).private
        downloaded = snapshot_download(out)
        assert (hf_logits(downloaded) - reference).abs().max() <= TOLERANCE
        card = Path(downloaded, "README.md").read_text()
        assert f"base_model: {repo}" in card and "library_name: transformers" in card


def _header_bytes(folder: Path) -> int:
    """Bytes of every safetensors file's length prefix and JSON header (the rest is tensor data)."""
    return sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in folder.glob("*.safetensors"))


def test_offline_loads_come_from_the_cache_pinned_to_the_sha(hub_env, tiny_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    base = tiny_models["gemma"]
    repo = unique_repo("offline")
    sha = upload_to_hub(base, repo)
    first = DistributedHFCheckpointer(f"hf://{repo}", tmp_path, "GEMMA").load_checkpoint()["model"]
    hub_env.clear_requests()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = DistributedHFCheckpointer(f"hf://{repo}@{sha}", tmp_path, "GEMMA").load_checkpoint()["model"]
    assert hub_env.requests == []  # nothing asked of the Hub
    assert not differences(first, again)


def test_streaming_reads_each_ranks_share_with_ranged_requests(hub_env, tiny_models, tmp_path):
    base = tiny_models["mistral"]
    repo = unique_repo("stream")
    upload_to_hub(base, repo)
    hub_env.clear_requests()
    cases = [case("stream", "MISTRAL", f"hf://{repo}", tmp_path / "out", base, streaming=True)]
    results = run_on_ranks(load_only, 2, cases, TOKENS, timeout=300)
    reference = hf_logits(base)
    for r in results:
        assert (r["stream"]["logits"] - reference).abs().max() <= TOLERANCE
    per_rank = [r["stream"]["bytes_read"] for r in results]
    tensors = _weights_bytes(base) - _header_bytes(base)
    assert sum(per_rank) == tensors and all(n < 0.6 * tensors for n in per_rank), (per_rank, tensors)
    # Beyond its tensor rows, each rank fetches only config.json, the index and the file headers.
    metadata = (base / "config.json").stat().st_size + (base / "model.safetensors.index.json").stat().st_size + _header_bytes(base)
    assert hub_env.bytes_served(f"/{repo}/resolve/") == tensors + 2 * metadata
    weight_gets = [r for r in hub_env.requests if r.method == "GET" and ".safetensors" in r.path and repo in r.path]
    assert weight_gets and all(r.range for r in weight_gets)  # no whole-file download


def test_hub_push_retries_a_transient_fault_and_a_hard_fault_changes_nothing(hub_env, tiny_models):
    base = tiny_models["llama2"]
    out = unique_repo("faults")
    model = build_model_from_dir("LLAMA2", base)
    checkpointer = DistributedHFCheckpointer(base, f"hf://{out}", "LLAMA2")
    checkpointer.load_model(model)
    commit_path = rf"^/api/models/{re.escape(out)}/commit/"
    hub_env.inject_fault("POST", commit_path, status=503, times=1)
    assert checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0) == f"hf://{out}@epoch-0"
    before = hub_env.commits(out)
    assert len(before) == 2

    hub_env.inject_fault("POST", commit_path, status=500, times=50)
    with torch.no_grad():
        model.norm.scale.mul_(2)
    with pytest.raises(CheckpointError, match="the complete checkpoint is kept at") as info:
        checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1)
    hub_env.clear_faults()
    assert hub_env.commits(out) == before
    kept = Path(str(info.value).rsplit("kept at ", 1)[1])
    assert (kept / "config.json").exists() and (kept / "model.safetensors").exists()
    assert (hf_logits(kept) - hf_logits(base)).abs().max() > 0  # it holds the new weights


@pytest.mark.parametrize(
    "source,message",
    [("hf://tester/no-such-repo", "not found"), ("hf://{repo}@no-such-branch", "revision 'no-such-branch' not found")],
)
def test_missing_repo_or_revision_is_a_clear_error(hub_env, tiny_models, tmp_path, source, message):
    repo = unique_repo("exists")
    upload_to_hub(tiny_models["llama2"], repo)
    checkpointer = DistributedHFCheckpointer(source.format(repo=repo), tmp_path, "LLAMA2")
    with pytest.raises(CheckpointError, match=message):
        checkpointer.load_checkpoint()


def test_a_bad_token_is_a_clear_error_without_the_token(hub_env, tiny_models, tmp_path, monkeypatch):
    repo = unique_repo("auth")
    upload_to_hub(tiny_models["llama2"], repo)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token_123")
    with pytest.raises(CheckpointError, match="not authorized") as info:
        DistributedHFCheckpointer(f"hf://{repo}", tmp_path, "LLAMA2").load_checkpoint()
    assert "hf_not_a_valid_token_123" not in str(info.value)


# ---- S3 -----------------------------------------------------------------------------------------


def test_s3_round_trip_on_two_ranks(s3_env, tiny_models):
    base = tiny_models["qwen2_tied"]
    fs = s3_env.filesystem()
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(str(base), f"{bucket}/base", recursive=True)
    options = {"storage_options": s3_env.storage_options}
    cases = [case("s3", "QWEN2", f"s3://{bucket}/base", f"s3://{bucket}/runs", base, **options)]
    results = run_on_ranks(load_forward_save_reload, 2, cases, TOKENS, timeout=300)
    reference = hf_logits(base)
    for r in results:
        assert (r["s3"]["logits"] - reference).abs().max() <= TOLERANCE and r["s3"]["bitwise"]
        assert r["s3"]["saved"] == f"s3://{bucket}/runs/epoch_0"
    local = Path(str(base) + "-from-s3")
    fs.get(f"{bucket}/runs/epoch_0", str(local), recursive=True)
    assert sorted(p.name for p in local.iterdir()) == sorted([p.name for p in base.iterdir()] + [MANIFEST_FILE])
    assert (hf_logits(local) - reference).abs().max() <= TOLERANCE


def test_keep_last_n_prunes_hub_tags(hub_env, tiny_models):
    from huggingface_hub import HfApi

    base = tiny_models["llama2"]
    out = unique_repo("prune")
    model = build_model_from_dir("LLAMA2", base)
    checkpointer = DistributedHFCheckpointer(base, f"hf://{out}", "LLAMA2", keep_last_n_checkpoints=2)
    checkpointer.load_model(model)
    published = save_steps(checkpointer, model, [1, 2, 3])
    assert published[-1] == f"hf://{out}@step-3"
    assert sorted(t.name for t in HfApi().list_repo_refs(out).tags) == ["step-2", "step-3"]
    assert len(hub_env.commits(out)) == 4  # the history keeps every commit; only the tag of step 1 is gone


def test_keep_last_n_prunes_fsspec_folders(tiny_models):
    base = tiny_models["llama2"]
    out = f"memory://prune/{uuid.uuid4().hex[:8]}"
    model = build_model_from_dir("LLAMA2", base)
    checkpointer = DistributedHFCheckpointer(base, out, "LLAMA2", keep_last_n_checkpoints=2)
    checkpointer.load_model(model)
    save_steps(checkpointer, model, [1, 2, 3])
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{out.removeprefix('memory:/')}/notes.txt", b"mine")
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0, step=4)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("memory:/"), detail=False))
    assert names == ["notes.txt", "step_3", "step_4"]


# ---- one process: listing, publishing at the location itself, fetching it whole -----------------


def _small_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "sub" / "a.bin").write_bytes(b"12345")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_list_files_and_fetch_folder_of_the_location_itself(kind, tmp_path, request):
    from checkpointer.storage.factory import make_location

    if kind == "hub":
        request.getfixturevalue("hub_env")
    location = make_location(place(kind, _small_folder(tmp_path / "src")), "location")
    files = location.list_files()
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == {"config.json": 2, "sub/a.bin": 5}
    fetched = fetch_folder(location)
    assert (fetched / "sub" / "a.bin").read_bytes() == b"12345" and (fetched / "config.json").exists()
    assert location.subfolder("sub").list_files() == {"a.bin": 5}


@pytest.mark.parametrize("value", ["{tmp}/missing", "memory://no/such/folder", "hf://tester/no-such-repo-listing"])
def test_list_files_of_nothing_is_a_clear_error(value, tmp_path, hub_env):
    from checkpointer.storage.factory import make_location

    with pytest.raises(CheckpointError, match="no such folder|not found"):
        make_location(value.format(tmp=tmp_path), "location").list_files()


def test_replace_with_publishes_at_the_location_itself(tmp_path, hub_env):
    from huggingface_hub import HfApi

    from checkpointer.storage.factory import make_location

    local = make_location(tmp_path / "out" / "model", "to")
    staging = local.staging_folder()
    _small_folder(staging / "x")
    assert local.replace_with(staging) == str(tmp_path / "out" / "model")
    assert (tmp_path / "out" / "model" / "x" / "sub" / "a.bin").exists() and not staging.exists()

    memory = make_location(f"memory://replace/{uuid.uuid4().hex[:8]}", "to")
    folder = _small_folder(memory.staging_folder() / "f")
    assert memory.replace_with(folder) == memory.url
    assert memory.list_files() == {"config.json": 2, "sub/a.bin": 5} and folder.exists()  # the source is kept

    repo = unique_repo("replace")
    hub = make_location(f"hf://{repo}", "to", private=False)
    url = hub.replace_with(folder, options=PublishOptions(card=None, message="my upload", tag="v1"))
    commits = hub_env.commits(repo)
    assert len(commits) == 2 and commits[0]["title"] == "my upload"
    assert url.endswith(f"/{repo}/commit/{commits[0]['id']}")
    assert set(commits[0]["files_changed"]) == {"config.json", "sub/a.bin"}  # no card asked for
    assert "v1" in {t.name for t in HfApi().list_repo_refs(repo).tags} and not HfApi().repo_info(repo).private
    (folder / "README.md").write_text("mine")
    hub.replace_with(folder, options=PublishOptions(card={"checkpoint": "x"}))
    assert hub_env.file_bytes(repo, "README.md") == b"mine"  # the user's README wins over a card
