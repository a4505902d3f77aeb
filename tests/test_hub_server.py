"""LocalHub against the unmodified huggingface_hub client, over real loopback sockets."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.sha import git_hash

from checkpointer.testing.hub_server import LocalHub
from checkpointer.testing.pytest_plugin import use_local_hub

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model-00001-of-00002.safetensors": os.urandom(20_000),
    "model-00002-of-00002.safetensors": os.urandom(12_345),
    "sub/dir/notes.txt": b"nested\n",
}


@pytest.fixture
def api(hub_env: LocalHub) -> HfApi:
    """An HfApi on the session hub (endpoint and token come from the patched environment)."""
    return HfApi()


@pytest.fixture
def repo(api: HfApi) -> str:
    """A fresh public model repo holding FILES in one commit on main."""
    repo_id = f"tester/r-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id)
    api.create_commit(repo_id, [CommitOperationAdd(p, d) for p, d in FILES.items()], commit_message="add files")
    return repo_id


def _user_files(paths) -> set[str]:
    return set(paths) - {".gitattributes"}


# ----------------------------------------------------------------------------------------- repos and commits


def test_whoami_and_bad_token(api: HfApi) -> None:
    assert api.whoami()["name"] == "tester"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").whoami()
    assert err.value.response.status_code == 401


def test_create_repo_public_by_default_and_exist_ok(api: HfApi, hub_env: LocalHub) -> None:
    repo_id = f"tester/c-{uuid.uuid4().hex[:8]}"
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.endpoint == hub_env.endpoint
    assert api.repo_info(repo_id).private is False
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True) == url
    dataset = api.create_repo(repo_id, repo_type="dataset")  # same name, other type: another repo
    assert dataset.repo_type == "dataset"
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(repo_id)
    assert api.dataset_info(repo_id).id == repo_id


def test_create_commit_is_one_commit(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    commits = hub_env.commits(repo)
    assert [c["title"] for c in commits] == ["add files", "initial commit"]
    assert commits[0]["files_changed"] == sorted(FILES)
    assert [c.commit_id for c in api.list_repo_commits(repo)] == [c["id"] for c in commits]
    assert api.repo_info(repo).sha == commits[0]["id"]
    for path, data in FILES.items():
        assert hub_env.file_bytes(repo, path) == data


def test_upload_file_and_folder(api: HfApi, hub_env: LocalHub, repo: str, tmp_path: Path) -> None:
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="config.json", repo_id=repo, commit_message="one file")
    folder = tmp_path / "ckpt"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "a.bin").write_bytes(b"a" * 1000)
    (folder / "index.json").write_bytes(b"{}")
    api.upload_folder(folder_path=folder, repo_id=repo, path_in_repo="step-1", commit_message="folder")
    newest, previous = hub_env.commits(repo)[:2]
    assert (newest["title"], newest["files_changed"]) == ("folder", ["step-1/index.json", "step-1/shards/a.bin"])
    assert (previous["title"], previous["files_changed"]) == ("one file", ["config.json"])
    assert hub_env.file_bytes(repo, "step-1/shards/a.bin") == b"a" * 1000
    assert hub_env.file_bytes(repo, "config.json") == b"v2"


def test_unchanged_files_are_not_committed_again(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    before = hub_env.commits(repo)
    info = api.create_commit(repo, [CommitOperationAdd("config.json", FILES["config.json"])], commit_message="same")
    assert info.oid == before[0]["id"]
    assert hub_env.commits(repo) == before


def test_list_tree_at_branch_and_commit(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    first = api.repo_info(repo).sha
    api.create_commit(repo, [CommitOperationDelete("config.json"), CommitOperationAdd("new.txt", b"n")],
                      commit_message="change")
    assert _user_files(api.list_repo_files(repo, revision=first)) == set(FILES)
    assert _user_files(api.list_repo_files(repo)) == set(FILES) - {"config.json"} | {"new.txt"}
    entries = {e.path: e for e in api.list_repo_tree(repo, revision=first, recursive=True)}
    for path, data in FILES.items():
        assert (entries[path].size, entries[path].blob_id, entries[path].lfs) == (len(data), git_hash(data), None)
    assert {p for p, e in entries.items() if not hasattr(e, "size")} == {"sub", "sub/dir"}
    top = {e.path for e in api.list_repo_tree(repo, revision=first)}
    assert top == set(FILES) - {"sub/dir/notes.txt"} | {"sub", ".gitattributes"}
    assert [e.path for e in api.list_repo_tree(repo, "sub/dir")] == ["sub/dir/notes.txt"]
    assert {e.path for e in api.get_paths_info(repo, ["config.json", "sub", "nope"], revision=first)} == {
        "config.json", "sub"}


def test_tree_paging_follows_link_header(api: HfApi, hub_env: LocalHub, repo: str, monkeypatch) -> None:
    expected = _user_files(api.list_repo_files(repo))
    monkeypatch.setattr(hub_env, "page_size", 2)
    hub_env.clear_requests()
    assert _user_files(api.list_repo_files(repo)) == expected
    tree_calls = [r for r in hub_env.requests if "/tree/" in r.path]
    assert len(tree_calls) == 4 and "cursor=2" in tree_calls[1].path  # 7 entries (2 dirs), 2 per page


# ----------------------------------------------------------------------------------------- downloads


def test_downloads_by_branch_tag_and_sha(api: HfApi, hub_env: LocalHub, repo: str, tmp_path: Path) -> None:
    sha = api.repo_info(repo).sha
    api.create_tag(repo, tag="v1")
    api.upload_file(path_or_fileobj=b"changed", path_in_repo="config.json", repo_id=repo)
    for revision in ("v1", sha):
        path = hf_hub_download(repo, "config.json", revision=revision)
        assert Path(path).read_bytes() == FILES["config.json"]
        folder = Path(snapshot_download(repo, revision=revision, local_dir=tmp_path / revision))
        for name, data in FILES.items():
            assert (folder / name).read_bytes() == data
    assert Path(hf_hub_download(repo, "config.json")).read_bytes() == b"changed"
    folder = Path(snapshot_download(repo, revision="main"))
    assert folder.name == api.repo_info(repo).sha
    shard = "model-00001-of-00002.safetensors"
    assert (folder / shard).read_bytes() == FILES[shard]


def test_resolve_headers_and_ranges(hub_env: LocalHub, repo: str) -> None:
    data = FILES["model-00002-of-00002.safetensors"]
    url = f"{hub_env.endpoint}/{repo}/resolve/main/model-00002-of-00002.safetensors"

    def fetch(method: str = "GET", range_: str | None = None):
        request = urllib.request.Request(url, method=method, headers={"Range": range_} if range_ else {})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    status, headers, body = fetch("HEAD")
    assert (status, body) == (200, b"")
    assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert int(headers["Content-Length"]) == int(headers["X-Linked-Size"]) == len(data)
    assert headers["X-Repo-Commit"] == hub_env.commits(repo)[0]["id"]
    assert fetch(range_="bytes=10-19")[::2] == (206, data[10:20])
    assert fetch(range_="bytes=-5")[1]["Content-Range"] == f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"
    assert fetch(range_="bytes=-5")[2] == data[-5:]
    status, headers, _ = fetch(range_=f"bytes={len(data)}-")
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(data)}")


def test_hffs_ranged_reads(hub_env: LocalHub, repo: str) -> None:
    name = "model-00001-of-00002.safetensors"
    data = FILES[name]
    fs = HfFileSystem()
    hub_env.clear_requests()
    with fs.open(f"{repo}/{name}", block_size=1024) as f:
        f.seek(5000)
        assert f.read(100) == data[5000:5100]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
    assert hub_env.bytes_served(name) < 2 * 1024 + 200  # two block reads, not the whole file
    assert fs.cat_file(f"{repo}/{name}", start=123, end=456) == data[123:456]
    ranged = [r for r in hub_env.requests if r.path.endswith(name) and r.method == "GET"]
    assert len(ranged) == 3 and all(r.status == 206 and r.range for r in ranged)


# ----------------------------------------------------------------------------------------- refs and deletes


def test_branches_tags_refs_and_commits(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    main_sha = api.repo_info(repo).sha
    api.create_branch(repo, branch="exp/1")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo, branch="exp/1")
    assert err.value.response.status_code == 409
    api.create_branch(repo, branch="exp/1", exist_ok=True)
    info = api.upload_file(path_or_fileobj=b"exp", path_in_repo="exp.txt", repo_id=repo, revision="exp/1")
    api.create_tag(repo, tag="exp-tag", revision="exp/1")
    refs = api.list_repo_refs(repo)
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", main_sha), ("exp/1", info.oid)}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("exp-tag", "refs/tags/exp-tag", info.oid)]
    assert [c.commit_id for c in api.list_repo_commits(repo, revision="exp/1")] == [
        c["id"] for c in hub_env.commits(repo, "exp/1")]
    assert hub_env.commits(repo, "exp/1")[1]["id"] == main_sha
    assert "exp.txt" not in api.list_repo_files(repo)
    api.delete_branch(repo, branch="exp/1")
    assert [b.name for b in api.list_repo_refs(repo).branches] == ["main"]
    assert hub_env.file_bytes(repo, "exp.txt", revision="exp-tag") == b"exp"


def test_delete_file_and_folder(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    api.delete_file("config.json", repo)
    api.delete_folder("sub", repo)
    assert _user_files(api.list_repo_files(repo)) == {p for p in FILES if p.startswith("model-")}
    assert hub_env.commits(repo)[0]["files_changed"] == ["sub/dir/notes.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("config.json", repo)


def test_file_where_a_folder_is_refused(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    before = hub_env.commits(repo)
    for path in ("sub", "config.json/inner.txt"):
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"x", path_in_repo=path, repo_id=repo)
        assert err.value.response.status_code == 409
    assert hub_env.commits(repo) == before


def test_stale_parent_commit_is_refused(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    base = api.repo_info(repo).sha
    first = api.create_commit(repo, [CommitOperationAdd("a.txt", b"a")], commit_message="a", parent_commit=base)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(repo, [CommitOperationAdd("b.txt", b"b")], commit_message="b", parent_commit=base)
    assert err.value.response.status_code == 412
    assert "A commit has happened since" in str(err.value)
    assert api.repo_info(repo).sha == first.oid
    assert "b.txt" not in api.list_repo_files(repo)



def test_concurrent_writers(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    base = api.repo_info(repo).sha

    def write(i: int, parent: str | None) -> bool:
        op = CommitOperationAdd(f"w{i}.txt", str(i).encode())
        try:
            api.create_commit(repo, [op], commit_message=f"w{i}", parent_commit=parent)
            return True
        except HfHubHTTPError as e:
            assert e.response.status_code == 412
            return False

    with ThreadPoolExecutor(4) as pool:
        racing = list(pool.map(write, range(4), [base] * 4))
        assert racing.count(True) == 1  # same parent: one winner, the others are told to refresh
        assert all(pool.map(write, range(4, 8), [None] * 4))  # no parent: all land, none lost
    files = set(api.list_repo_files(repo))
    assert {f"w{i}.txt" for i in range(4, 8)} <= files
    assert len({f"w{i}.txt" for i in range(4)} & files) == 1
    assert len(hub_env.commits(repo)) == 2 + 1 + 4

# ----------------------------------------------------------------------------------------- errors and auth


def test_not_found_errors(api: HfApi, repo: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("tester/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/does-not-exist", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.bin")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo, "no/such/dir"))


def test_private_repo_needs_a_token(api: HfApi, hub_env: LocalHub) -> None:
    repo_id = f"tester/p-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)
    assert api.repo_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(repo_id, token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=repo_id)
    assert Path(hf_hub_download(repo_id, "s.txt")).read_bytes() == b"secret"


# ----------------------------------------------------------------------------------------- LFS


def test_lfs_upload_and_download(hub_env: LocalHub, monkeypatch, tmp_path: Path) -> None:
    with LocalHub(lfs_threshold=4096) as lfs_hub:
        use_local_hub(monkeypatch, lfs_hub, tmp_path / "hf_home")  # also sets HF_HUB_DISABLE_XET
        api = HfApi()
        big, small = os.urandom(10_000), b"tiny"
        api.create_repo("tester/lfs")
        api.create_commit("tester/lfs", [CommitOperationAdd("big.bin", big), CommitOperationAdd("small.txt", small)],
                          commit_message="lfs")
        calls = [(r.method, r.path.split("?")[0], r.status) for r in lfs_hub.requests]
        assert ("POST", "/tester/lfs.git/info/lfs/objects/batch", 200) in calls
        assert [c for c in calls if c[0] == "PUT"] == [
            ("PUT", c[1], 200) for c in calls if c[1].startswith(f"/lfs-upload/{hashlib.sha256(big).hexdigest()}/")]
        entries = {e.path: e for e in api.list_repo_tree("tester/lfs")}
        assert entries["big.bin"].lfs.sha256 == hashlib.sha256(big).hexdigest()
        assert entries["small.txt"].lfs is None
        assert Path(hf_hub_download("tester/lfs", "big.bin")).read_bytes() == big
        assert lfs_hub.commits("tester/lfs")[0]["files_changed"] == ["big.bin", "small.txt"]

        lfs_hub.clear_requests()  # same bytes under another name: already stored, not sent again
        api.create_commit("tester/lfs", [CommitOperationAdd("copy.bin", big)], commit_message="copy")
        assert not [r for r in lfs_hub.requests if r.method == "PUT"]
        assert lfs_hub.file_bytes("tester/lfs", "copy.bin") == big


# ----------------------------------------------------------------------------------------- faults


def test_503_once_on_download_is_retried(hub_env: LocalHub, repo: str) -> None:
    hub_env.inject_fault("HEAD", r"/resolve/main/config\.json$", status=503)
    hub_env.clear_requests()
    assert Path(hf_hub_download(repo, "config.json")).read_bytes() == FILES["config.json"]
    heads = [r.status for r in hub_env.requests if r.method == "HEAD"]
    assert heads == [503, 200]


def test_truncated_download_is_retried(hub_env: LocalHub, repo: str) -> None:
    name = "model-00002-of-00002.safetensors"
    data = FILES[name]
    hub_env.inject_fault("GET", "/resolve/main/" + name, truncate=True)
    hub_env.clear_requests()
    assert Path(hf_hub_download(repo, name)).read_bytes() == data
    cut, retry = [r for r in hub_env.requests if r.method == "GET"]
    assert (cut.status, cut.bytes_sent) == (200, len(data) // 2)
    resumed_at = int(retry.range[len("bytes="):-1]) if retry.range else 0  # the client may restart from 0
    assert retry.bytes_sent == len(data) - resumed_at
    assert hub_env.bytes_served(name) == len(data) // 2 + len(data) - resumed_at


def test_reset_on_commit_leaves_repo_unchanged(api: HfApi, hub_env: LocalHub, repo: str) -> None:
    before = hub_env.commits(repo)
    hub_env.inject_fault("POST", r"/commit/main$", reset=True)
    with pytest.raises(httpx2.TransportError) as err:  # a transport error, not an HTTP answer
        api.create_commit(repo, [CommitOperationAdd("lost.txt", b"x")], commit_message="lost")
    assert not isinstance(err.value, HfHubHTTPError)
    assert hub_env.commits(repo) == before
    api.create_commit(repo, [CommitOperationAdd("kept.txt", b"y")], commit_message="kept")
    assert hub_env.file_bytes(repo, "kept.txt") == b"y"


def test_delay_and_fault_bookkeeping(api: HfApi, hub_env: LocalHub) -> None:
    hub_env.inject_fault("GET", r"/api/whoami-v2", delay=0.3, times=2)
    hub_env.clear_requests()
    for _ in range(3):
        api.whoami()
    assert [r.delay for r in hub_env.requests if r.path.startswith("/api/whoami-v2")] == [0.3, 0.3, 0.0]  # twice, then spent
    hub_env.inject_fault("*", r"/api/whoami-v2", status=401)
    hub_env.clear_faults()
    assert api.whoami()["name"] == "tester"
    with pytest.raises(ValueError):
        hub_env.inject_fault("GET", ".*")


# ----------------------------------------------------------------------------------------- persistence, CLI


def test_root_directory_persists_repos(hub_env: LocalHub, tmp_path: Path) -> None:
    with LocalHub(root=str(tmp_path / "store")) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("tester/kept")
        api.create_branch("tester/kept", branch="dev")
        api.create_commit("tester/kept", [CommitOperationAdd("d.bin", b"data"), CommitOperationAdd("empty", b"")],
                          commit_message="data", revision="dev")
        history = hub.commits("tester/kept", "dev")
        assert api.whoami()["name"] == "tester"  # leaves a keep-alive connection in the client's pool
    with pytest.raises(httpx2.TransportError) as err:  # stopped means stopped: pooled connections are closed too
        api.whoami()
    assert not isinstance(err.value, HfHubHTTPError)
    with LocalHub(root=str(tmp_path / "store")) as hub:
        assert hub.commits("tester/kept", "dev") == history
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        assert api.list_repo_files("tester/kept", revision="dev") == [".gitattributes", "d.bin", "empty"]
        assert hub.file_bytes("tester/kept", "d.bin", revision="dev") == b"data"
        fs = HfFileSystem(endpoint=hub.endpoint, token=hub.token, skip_instance_cache=True)
        assert fs.cat_file("tester/kept@dev/d.bin", start=1, end=3) == b"at"  # served from the on-disk blob
        for name, data in (("d.bin", b"data"), ("empty", b"")):
            path = hf_hub_download("tester/kept", name, revision="dev", endpoint=hub.endpoint, token=hub.token,
                                   cache_dir=tmp_path / "cache")
            assert Path(path).read_bytes() == data


def test_command_line_server(hub_env: LocalHub) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "checkpointer.testing.hub_server", "--port", "0",
                             "--token", "hf_cli"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        endpoint = proc.stdout.readline().split()[-1]  # type: ignore[union-attr]
        assert HfApi(endpoint=endpoint, token="hf_cli").whoami()["name"] == "tester"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
