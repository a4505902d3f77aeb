"""Checkpoints on the Hugging Face Hub (``hf://[datasets/]ns/repo[@revision][/subfolder]``).

Loading pins the revision to the commit sha it resolves to (once, on rank 0), then
either downloads only the needed files into the Hugging Face cache once per node, or
(``streaming``) reads each rank's byte ranges with HTTP range requests. Publishing makes
exactly one commit per checkpoint with ``create_commit`` against the branch head it read
(``parent_commit``), with a model card, then tags it ``epoch-N``/``step-N``.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers, http_backoff

from checkpointer.distributed import local_rank, on_all_ranks, on_rank_zero
from checkpointer.errors import CheckpointError, CheckpointFormatError
from checkpointer.folders import Folder, LocalFolder, check_relative_name
from checkpointer.hf_files import CONFIG_FILE, INDEX_FILE, files_to_fetch
from checkpointer.location_urls import HubUrl
from checkpointer.locations import CHECKPOINT_NAME, cache_root, upload_order, url_key
from checkpointer.lora import ADAPTER_CONFIG_FILE, ADAPTER_DIR
from checkpointer.manifest import MANIFEST_FILE
from checkpointer.training_state import TRAINING_STATE_DIR
from checkpointer.model_card import CARD_MARKER, model_card
from checkpointer.retry import with_retries

README = "README.md"


def _hub_error(url: HubUrl, error: Exception) -> CheckpointError:
    """A clear message for the Hub's errors (never echoing the token)."""
    if isinstance(error, GatedRepoError):
        return CheckpointError(f"{url}: {url.repo_id} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(error, RevisionNotFoundError):
        return CheckpointError(
            f"{url}: revision {url.revision!r} not found in {url.repo_id}: name an existing branch, tag or commit "
            f"after '@' (a '/' in it written %2F)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return CheckpointError(
            f"{url}: repository {url.repo_id} not found (or it is private and HF_TOKEN does not grant access)"
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return CheckpointError(f"{url}: not authorized ({status}): set HF_TOKEN to a token with access to {url.repo_id}")
    return CheckpointError(f"{url}: {type(error).__name__}: {error}")


def repo_path(url: HubUrl, name: str) -> str:
    """The path of file ``name`` of the folder ``url`` names, inside its repo."""
    check_relative_name(name, str(url))
    return f"{url.subfolder}/{name}" if url.subfolder else name


class HubFolder:
    """Byte-range reads of a Hub folder at a pinned commit."""

    def __init__(self, url: HubUrl, sha: str, sizes: dict[str, int]):
        self.url, self.sha, self.sizes = url, sha, sizes

    def describe(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else str(self.url)

    def repo_path(self, name: str) -> str:
        return repo_path(self.url, name)

    def exists(self, name: str) -> bool:
        return name in self.sizes

    def size(self, name: str) -> int:
        if name not in self.sizes:
            raise CheckpointFormatError(f"{self.describe(name)}: file not found at commit {self.sha}")
        return self.sizes[name]

    def read(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        link = hf_hub_url(self.url.repo_id, self.repo_path(name), repo_type=self.url.repo_type, revision=self.sha, endpoint=constants.ENDPOINT)
        headers = build_hf_headers() | {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        response = http_backoff("GET", link, headers=headers, max_retries=4, base_wait_time=0.5)
        if response.status_code != 206 or len(response.content) != length:
            raise CheckpointFormatError(
                f"{self.describe(name)}: ranged read of {length} bytes at {offset} answered {response.status_code} "
                f"with {len(response.content)} bytes"
            )
        return response.content

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        out = out.cast("B")
        out[:] = self.read(name, offset, len(out))

    def close(self) -> None:
        pass


class HubLocation:
    """A repo (or a folder of it) on the Hub, at a branch, tag or commit."""

    def __init__(self, url: HubUrl, private: bool = True):
        self.url = url
        self.private = private
        self.api = HfApi(endpoint=constants.ENDPOINT)

    def describe(self, name: str = "") -> str:
        return str(self.checkpoint(name).url) if name else str(self.url)

    def _in_folder(self, path: str) -> str | None:
        prefix = f"{self.url.subfolder}/" if self.url.subfolder else ""
        return path[len(prefix) :] if path.startswith(prefix) and "/" not in path[len(prefix) :] else None

    def _resolve(self) -> tuple[str, dict[str, int]]:
        """The commit sha the revision points at, and the files of our folder with their sizes."""
        try:
            info = with_retries(
                lambda: self.api.repo_info(self.url.repo_id, repo_type=self.url.repo_type, revision=self.url.revision, files_metadata=True),
                f"resolving {self.url}",
            )
        except (HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise _hub_error(self.url, e) from None
        sizes = {self._in_folder(s.rfilename): s.size or 0 for s in info.siblings or []}
        sizes.pop(None, None)
        return info.sha, sizes

    def open(self, group=None, streaming: bool = False, checkpoint_files=None) -> Folder:
        if constants.HF_HUB_OFFLINE:
            return self._open_cached(self.url.revision or "main")
        sha, sizes = on_rank_zero(self._resolve, group)
        if streaming:
            return HubFolder(self.url, sha, sizes)
        remote = HubFolder(self.url, sha, sizes)
        names = on_rank_zero(
            lambda: files_to_fetch(set(sizes), lambda: remote.read(INDEX_FILE, 0, remote.size(INDEX_FILE)), str(self.url), checkpoint_files),
            group,
        )
        patterns = [remote.repo_path(n) for n in names]
        on_all_ranks(lambda: self._download(sha, patterns) if local_rank(group) == 0 else None, group)
        return on_all_ranks(lambda: self._open_cached(sha), group)

    def _download(self, sha: str, patterns: list[str]) -> None:
        try:
            with_retries(
                lambda: snapshot_download(self.url.repo_id, repo_type=self.url.repo_type, revision=sha, allow_patterns=patterns),
                f"downloading {self.url}",
            )
        except (HfHubHTTPError, RepositoryNotFoundError) as e:
            raise _hub_error(self.url, e) from None

    def _open_cached(self, revision: str) -> Folder:
        """The cached snapshot at ``revision`` (a sha, or a ref the cache knows), found via its config.json."""
        config = try_to_load_from_cache(
            self.url.repo_id, repo_path(self.url, CONFIG_FILE), revision=revision, repo_type=self.url.repo_type
        )
        if not isinstance(config, str):
            raise CheckpointError(f"{self.url}: not in the local Hugging Face cache at revision {revision}")
        folder = Path(config).parent
        snapshot = folder.parents[len(Path(self.url.subfolder).parts) - 1] if self.url.subfolder else folder
        return LocalFolder(folder, trusted_root=snapshot.parent.parent)

    # ---- publishing -----------------------------------------------------------------------

    def staging_dir(self, name: str) -> Path:
        return cache_root() / "staging" / url_key(str(self.url)) / name

    def _branch(self) -> str:
        return self.url.revision or "main"

    def _head(self) -> tuple[str, set[str]]:
        """Create the repo (private by default) and branch if missing; the branch head and its files."""
        repo, kind, branch = self.url.repo_id, self.url.repo_type, self._branch()
        self.api.create_repo(repo, repo_type=kind, private=self.private, exist_ok=True)
        self.api.create_branch(repo, repo_type=kind, branch=branch, exist_ok=True)
        info = self.api.repo_info(repo, repo_type=kind, revision=branch)
        return info.sha, {s.rfilename for s in info.siblings or []}

    def _operations(self, folder: Path, existing: set[str], card: dict[str, Any]) -> list:
        """Add every staged file (and the card); delete earlier checkpoint files this one replaces."""
        prefix = f"{self.url.subfolder}/" if self.url.subfolder else ""
        new = {prefix + rel: folder / rel for rel in upload_order(folder)}
        operations: list = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(p)) for path, p in new.items()]
        readme = prefix + README
        if readme not in existing or self._card_is_ours(readme):
            operations.append(CommitOperationAdd(readme, model_card(self.url.repo_id, card).encode()))
        stale = [p for p in existing if p not in new and _is_checkpoint_file(p.removeprefix(prefix)) and p.startswith(prefix)]
        return operations + [CommitOperationDelete(path_in_repo=p) for p in stale]

    def _card_is_ours(self, readme: str) -> bool:
        link = hf_hub_url(self.url.repo_id, readme, repo_type=self.url.repo_type, revision=self._branch(), endpoint=constants.ENDPOINT)
        response = http_backoff("GET", link, headers=build_hf_headers(), max_retries=3)
        return response.status_code == 200 and CARD_MARKER in response.text

    def publish(self, folder: Path, name: str, card: dict[str, Any]) -> str:
        """One commit with every file of ``folder`` (and the card), tagged after ``name``."""
        save_id = uuid.uuid4().hex
        try:
            commit = with_retries(lambda: self._commit_once(folder, name, card, save_id), f"pushing {name} to {self.url}")
            tag = _tag(name)
            if tag in {t.name for t in self.api.list_repo_refs(self.url.repo_id, repo_type=self.url.repo_type).tags}:
                self.api.delete_tag(self.url.repo_id, tag=tag, repo_type=self.url.repo_type)
            self.api.create_tag(self.url.repo_id, tag=tag, revision=commit, repo_type=self.url.repo_type)
        except Exception as e:
            raise CheckpointError(
                f"push of {name} to {self.url} failed ({_hub_error(self.url, e) if isinstance(e, HfHubHTTPError) else e}); "
                f"the complete checkpoint is kept at {folder}"
            ) from e
        shutil.rmtree(folder, ignore_errors=True)
        return self.describe(name)

    def _commit_once(self, folder: Path, name: str, card: dict[str, Any], save_id: str) -> str:
        """Commit against the current head; if an earlier attempt already landed, return that commit."""
        head, existing = self._head()
        landed = self._find_landed(save_id)
        if landed:
            return landed
        info = self.api.create_commit(
            self.url.repo_id,
            operations=self._operations(folder, existing, card),
            commit_message=f"checkpointer: {name}",
            commit_description=f"save-id: {save_id}",
            repo_type=self.url.repo_type,
            revision=self._branch(),
            parent_commit=head,
        )
        return info.oid

    def _find_landed(self, save_id: str) -> str | None:
        commits = self.api.list_repo_commits(self.url.repo_id, repo_type=self.url.repo_type, revision=self._branch())
        for commit in commits[:5]:
            if save_id in (commit.message or ""):
                return commit.commit_id
        return None

    # ---- reading back and pruning ----------------------------------------------------------

    def checkpoint(self, name: str) -> HubLocation:
        return HubLocation(HubUrl(self.url.repo_id, self.url.repo_type, _tag(name), self.url.subfolder), self.private)

    def subfolder(self, path: str) -> HubLocation:
        return HubLocation(self.url.with_subfolder(path), self.private) if path else self

    def checkpoint_names(self) -> list[str]:
        try:
            refs = self.api.list_repo_refs(self.url.repo_id, repo_type=self.url.repo_type)
        except RepositoryNotFoundError:
            return []
        names = [t.name.replace("-", "_") for t in refs.tags]
        return sorted(n for n in names if CHECKPOINT_NAME.match(n))

    def read_file(self, path: str) -> bytes | None:
        link = hf_hub_url(self.url.repo_id, repo_path(self.url, path), repo_type=self.url.repo_type, revision=self.url.revision, endpoint=constants.ENDPOINT)
        response = http_backoff("GET", link, headers=build_hf_headers(), max_retries=4, base_wait_time=0.5)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise CheckpointError(f"{self.url}/{path}: the Hub answered {response.status_code}")
        return response.content

    def fetch_folder(self, path: str, group=None) -> Path:
        """A local copy (in the Hugging Face cache) of the subfolder ``path``, fetched once per node."""
        sha, sizes = on_rank_zero(self._resolve_all, group)
        folder_prefix = repo_path(self.url, path) + "/"
        patterns = [f"{folder_prefix}*"]
        on_all_ranks(lambda: self._download(sha, patterns) if local_rank(group) == 0 else None, group)
        first = next((f for f in sorted(sizes) if f.startswith(folder_prefix)), None)
        if first is None:
            raise CheckpointError(f"{self.url}/{path}: no such folder at commit {sha}")
        cached = on_all_ranks(
            lambda: try_to_load_from_cache(self.url.repo_id, first, revision=sha, repo_type=self.url.repo_type), group
        )
        if not isinstance(cached, str):
            raise CheckpointError(f"{self.url}/{path}: download incomplete (not in the Hugging Face cache)")
        return Path(cached[: -len(first)]) / repo_path(self.url, path)

    def _resolve_all(self) -> tuple[str, dict[str, int]]:
        """The commit sha and every file of the repo with its size (paths from the repo root)."""
        info = with_retries(
            lambda: self.api.repo_info(self.url.repo_id, repo_type=self.url.repo_type, revision=self.url.revision, files_metadata=True),
            f"resolving {self.url}",
        )
        return info.sha, {s.rfilename: s.size or 0 for s in info.siblings or []}

    def remove(self, name: str) -> None:
        """On the Hub a checkpoint is a tag; removing it drops the tag (history keeps the files)."""
        if not CHECKPOINT_NAME.match(name):
            raise CheckpointError(f"{self.describe(name)}: refusing to remove something that is not a checkpoint")
        self.api.delete_tag(self.url.repo_id, tag=_tag(name), repo_type=self.url.repo_type)


def _is_checkpoint_file(path: str) -> bool:
    """Files an earlier checkpoint at the same place wrote, which a new one replaces."""
    return path.startswith((f"{TRAINING_STATE_DIR}/", f"{ADAPTER_DIR}/")) or (
        "/" not in path and (path.endswith(".safetensors") or path in (INDEX_FILE, MANIFEST_FILE, ADAPTER_CONFIG_FILE))
    )


def _tag(name: str) -> str:
    """``epoch_3`` -> ``epoch-3`` (the Hub's tags for checkpoints)."""
    return name.replace("_", "-")
