"""Two simulated nodes with no shared file system (torchrun --nnodes 2, one mount namespace per node).

The same path (CHECKPOINTER_CACHE, HF_HOME, output_dir, a local checkpoint_dir) is private to
each node: see checkpointer.testing.nodes. Every save publishes from rank 0's node what all four
ranks hold; loads of a folder only rank 0's node has go through the process group.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.testing.nodes import SimulatedCluster, can_simulate_nodes, kill_node, wait_all

pytestmark = pytest.mark.skipif(not can_simulate_nodes(), reason="simulating nodes needs root and unshare (mount namespaces)")

WORKER = Path(__file__).with_name("node_workers.py")


def launch(cluster: SimulatedCluster, mode: str, base: str, out: str, config_dir: Path, env: dict | None = None, **options):
    results = cluster.root / f"results-{uuid.uuid4().hex[:6]}"
    results.mkdir()
    common = cluster.common
    environment = {"CHECKPOINTER_CACHE": str(common / "cache"), "HF_HOME": str(common / "hf_home"), **(env or {})}
    args = [mode, base, out, str(results), json.dumps({"config_dir": str(config_dir), **options})]
    return cluster, results, cluster.start(WORKER, args, environment)


def reports(results: Path, world: int) -> list[dict]:
    return [json.loads((results / f"rank-{r}.json").read_text()) for r in range(world)]


def finish(launched, timeout: float = 300.0) -> list[dict]:
    cluster, results, procs = launched
    runs = wait_all(procs, timeout)
    found = sorted(results.glob("rank-*.json"))
    assert len(found) == cluster.nodes * cluster.nproc_per_node, "\n".join(r.output[-4000:] for r in runs)
    return reports(results, len(found))


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file the manifest lists, from the files themselves."""
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in files}


@pytest.fixture(scope="module")
def two_node_save(tiny_llama3, tmp_path_factory):
    """A 2 x 2 save to a node-local output_dir, from a checkpoint_dir that only rank 0's node has."""
    cluster = SimulatedCluster(tmp_path_factory.mktemp("nodes"))
    shutil.copytree(tiny_llama3, cluster.node_dir(0) / "base")
    common = cluster.common
    saved = finish(launch(cluster, "save", str(common / "base"), str(common / "out"), tiny_llama3))
    return cluster, saved


def test_save_to_a_node_local_output_dir_lands_complete_on_rank_zeros_node(two_node_save, tiny_llama3):
    cluster, saved = two_node_save
    assert [r.get("error") for r in saved] == [None] * 4, saved[0].get("traceback")
    published = cluster.node_dir(0) / "out" / "epoch_0"
    assert {r["saved"] for r in saved} == {str(cluster.common / "out" / "epoch_0")}
    on_node1 = sorted(p.relative_to(cluster.node_dir(1)).as_posix() for p in cluster.node_dir(1).rglob("*") if "out" in p.parts)
    assert on_node1 == ["out"], on_node1  # nothing visible or left behind on the other node
    assert sorted(p.name for p in (published / "training_state").iterdir()) == [".metadata.json"] + [f"__{r}_0.distcp" for r in range(4)]
    # Every byte of node 1's boxes crossed once: ranks 2 and 3 only sent, ranks 0 and 1 only received.
    assert [r["traffic"]["sent"] > 0 for r in saved] == [False, False, True, True]
    assert sum(r["traffic"]["sent"] for r in saved) == sum(r["traffic"]["received"] for r in saved)
    # A real peer reads it: transformers loads the published folder, with the base's tensors (names, shapes).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(published)
    base = {k: v for f in sorted(tiny_llama3.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items() if k in base} == {k: tuple(v.shape) for k, v in base.items()}
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_resume_on_another_number_of_nodes_from_a_folder_only_rank_zeros_node_has(two_node_save, tiny_llama3):
    cluster, saved = two_node_save
    one_per_node = SimulatedCluster(cluster.root, nodes=2, nproc_per_node=1)
    common = cluster.common
    resumed = finish(launch(one_per_node, "resume", str(common / "base"), str(common / "out"), tiny_llama3))
    assert [r.get("error") for r in resumed] == [None, None], resumed[0].get("traceback")
    assert {r["weights"] for r in resumed} == {saved[0]["weights"]}
    assert {r["optimizer"] for r in resumed} == {saved[0]["optimizer"]}
    assert [r["progress"] for r in resumed] == [{"step": 1}] * 2


@pytest.mark.parametrize("kind", ["hub", "s3"])
def test_save_to_a_remote_publishes_what_all_nodes_hold(kind, two_node_save, tiny_llama3, request, tmp_path):
    cluster, saved = two_node_save
    remote = SimulatedCluster(tmp_path / "cluster")
    if kind == "hub":
        from huggingface_hub import HfApi, snapshot_download
        from places import unique_repo, upload_to_hub

        request.getfixturevalue("hub_env")
        repo = unique_repo("nodes")
        upload_to_hub(tiny_llama3, f"{repo}-base")
        run = finish(launch(remote, "save", f"hf://{repo}-base", f"hf://{repo}", tiny_llama3))
        assert [r.get("error") for r in run] == [None] * 4, run[0].get("traceback")
        assert len(HfApi().list_repo_commits(repo)) == 2  # the repo's creation and exactly one checkpoint commit
        published = Path(snapshot_download(repo, cache_dir=tmp_path / "download"))
    else:
        s3 = request.getfixturevalue("s3_env")
        fs, bucket = s3.filesystem(), f"nodes-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        fs.put(str(tiny_llama3), f"{bucket}/base", recursive=True)
        run = finish(launch(remote, "save", f"s3://{bucket}/base", f"s3://{bucket}/runs", tiny_llama3, storage_options=s3.storage_options))
        assert [r.get("error") for r in run] == [None] * 4, run[0].get("traceback")
        published = tmp_path / "download"
        fs.get(f"{bucket}/runs/epoch_0", str(published), recursive=True)
    # The same job, the same bytes: every file is the node-local save's.
    assert file_digests(published) == file_digests(cluster.node_dir(0) / "out" / "epoch_0")
    assert not list((remote.node_dir(1) / "cache").glob("staging/*/epoch_0"))


def test_a_tensor_parallel_save_sends_column_boxes_across_nodes_that_verify_where_they_land(tiny_llama3, tmp_path):
    """FSDP2 over TP 2 on 2 x 2 ranks: node 1's column boxes (one file run per row) travel to node 0 and are written there."""
    from checkpointer.cli import main as cli_main

    cluster = SimulatedCluster(tmp_path / "cluster")
    shutil.copytree(tiny_llama3, cluster.node_dir(0) / "base")
    saved = finish(launch(cluster, "save", str(cluster.common / "base"), str(cluster.common / "out"), tiny_llama3, tensor_parallel=2))
    assert [r.get("error") for r in saved] == [None] * 4, saved[0].get("traceback")
    assert [r["traffic"]["sent"] > 0 for r in saved] == [False, False, True, True]
    published = cluster.node_dir(0) / "out" / "epoch_0"
    files = json.loads((published / MANIFEST_FILE).read_text())["files"]
    assert any(len(r) == 5 for name, f in files.items() if name.endswith(".safetensors") for r in f["xxh3_128"])  # column boxes
    assert cli_main(["verify", str(published), "--full"]) == 0  # each landed where its sender hashed it


def test_with_one_file_system_no_byte_travels(tiny_llama3, tmp_path):
    from node_workers import save_on_one_node

    from checkpointer.testing.multiprocess import run_on_ranks

    results = run_on_ranks(save_on_one_node, 2, str(tiny_llama3), str(tmp_path / "out"))
    assert results == [{"sent": 0, "received": 0, "nodes": 1}] * 2
    assert (tmp_path / "out" / "epoch_0" / MANIFEST_FILE).is_file()
    assert not list((tmp_path / "out").glob(".checkpointer-probe-*"))


def test_a_checkpoint_dir_that_differs_between_nodes_is_refused_on_every_rank(tiny_llama3, tmp_path):
    cluster = SimulatedCluster(tmp_path / "cluster")
    for node in (0, 1):
        shutil.copytree(tiny_llama3, cluster.node_dir(node) / "base")
    (cluster.node_dir(1) / "base" / "tokenizer_config.json").write_text("{}")
    run = finish(launch(cluster, "resume", str(cluster.common / "base"), str(cluster.common / "out"), tiny_llama3))
    errors = [r.get("error", "no error") for r in run]
    assert all("differs between rank 0 and rank 2" in e and "tokenizer_config.json" in e for e in errors), errors


def test_a_node_killed_mid_save_leaves_the_previous_checkpoint_and_the_others_name_it(two_node_save, tiny_llama3):
    cluster, saved = two_node_save
    common = cluster.common
    published = cluster.node_dir(0) / "out" / "epoch_0"
    before = (published / MANIFEST_FILE).read_bytes()
    hang = {"CHECKPOINTER_FAILPOINT": "save:write@2:hang,save:write@3:hang"}
    launched = launch(cluster, "save", str(common / "base"), str(common / "out"), tiny_llama3, env=hang)
    _, results, procs = launched
    deadline = time.monotonic() + 240
    while not (results / "saving-2").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # ranks 2 and 3 hang in the write; ranks 0 and 1 wait for their boxes
    killed_at = time.time()
    kill_node(procs[1])
    wait_all(procs, 120)
    home = reports(results, 2)
    for report in home:
        assert "node 1 (ranks 2, 3)" in report["error"], report
        assert report["failed_at"] - killed_at < 60
    assert (published / MANIFEST_FILE).read_bytes() == before
    visible = sorted(p.name for p in (cluster.node_dir(0) / "out").iterdir() if not p.name.startswith("."))
    assert visible == ["epoch_0"]
    assert not (cluster.node_dir(0) / "out" / ".epoch_0.partial").exists()
