"""Checkpoints on the Hugging Face Hub (``hf://[datasets/]ns/repo[@revision][/subfolder]``).

Loading pins the revision to the commit sha it resolves to (once, on rank 0), then
either downloads only the needed files into the Hugging Face cache once per node, or
(``streaming``) reads each rank's byte ranges with HTTP range requests. Publishing makes
exactly one commit per checkpoint with ``create_commit`` against the branch head it read
(``parent_commit``), with a model card, then tags it ``epoch-N``/``step-N``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import build_hf_headers, http_backoff

from checkpointer.errors import (
    CheckpointAccessError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointTransportError,
)
from checkpointer.format.digests import hash_chunks
from checkpointer.format.folder import Folder, LocalFolder, RangeReadFolder, check_relative_name, local_files
from checkpointer.format.hf_files import CONFIG_FILE, INDEX_FILE, files_to_fetch
from checkpointer.format.manifest import MANIFEST_FILE, TRAINING_STATE_DIR
from checkpointer.format.model_card import CARD_MARKER, model_card
from checkpointer.format.peft import ADAPTER_CONFIG_FILE, ADAPTER_DIR
from checkpointer.runtime.cache import cache_root, url_key
from checkpointer.runtime.retry import is_transient, with_retries
from checkpointer.storage.location import (
    CHECKPOINT_NAME,
    PublishOptions,
    kept_on_failure,
    remote_staging_dir,
    remote_staging_folder,
    upload_order,
)
from checkpointer.storage.urls import HubUrl

README = "README.md"
_DOWNLOAD_THREADS = 8


def _hub_error(url: HubUrl, error: Exception) -> CheckpointError:
    """A clear message for the Hub's errors (never echoing the token)."""
    if _unreachable(error):
        return CheckpointTransportError(
            f"{url}: the Hub at {constants.ENDPOINT} could not be reached after retries ({type(error).__name__}: {error}); "
            "check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to load a revision from the local cache",
            url=str(url),
        )
    if isinstance(error, GatedRepoError):
        return CheckpointAccessError(f"{url}: {url.repo_id} is gated: accept its terms on the Hub and set HF_TOKEN", url=str(url))
    if isinstance(error, RevisionNotFoundError):
        return CheckpointNotFoundError(
            f"{url}: revision {url.revision!r} not found in {url.repo_id}: name an existing branch, tag or commit "
            f"after '@' (a '/' in it written %2F)",
            url=str(url),
        )
    if isinstance(error, RepositoryNotFoundError):
        return CheckpointNotFoundError(
            f"{url}: repository {url.repo_id} not found (or it is private and HF_TOKEN does not grant access)",
            url=str(url),
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return CheckpointAccessError(f"{url}: not authorized ({status}): set HF_TOKEN to a token with access to {url.repo_id}", url=str(url))
    return CheckpointTransportError(f"{url}: {type(error).__name__}: {error}", url=str(url))


def _unreachable(error: Exception) -> bool:
    """No answer at all (DNS, refused or reset connections, timeouts), as opposed to an HTTP error status."""
    return getattr(error, "response", None) is None and is_transient(error)


_HUB_FAILURES = (HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError)


@contextlib.contextmanager
def _hub_errors(url: HubUrl) -> Iterator[None]:
    """The Hub's refusals and an unreachable endpoint as checkpointer errors naming ``url``; other errors as they are."""
    try:
        yield
    except Exception as e:
        if isinstance(e, _HUB_FAILURES) or _unreachable(e):
            raise _hub_error(url, e) from None
        raise


@dataclass(frozen=True)
class RemoteFile:
    """A file of a Hub repo as the Hub describes it."""

    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # every file: the git blob id


def _digest(path: Path, expected: RemoteFile) -> str:
    """The digest of ``path`` of the kind ``expected`` has (sha256, else git's blob sha1)."""
    size = path.stat().st_size
    digest = hashlib.sha256() if expected.sha256 else hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:  # read in order: the offset is where f already is
        return hash_chunks(lambda _offset, chunk: f.readinto(chunk), size, digest)


def repo_path(url: HubUrl, name: str) -> str:
    """The path of file ``name`` of the folder ``url`` names, inside its repo."""
    check_relative_name(name, str(url))
    return url.folder_prefix + name


class HubFolder(RangeReadFolder):
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
            raise CheckpointNotFoundError(f"{self.describe(name)}: file not found at commit {self.sha}", url=str(self.url), file=self.describe(name))
        return self.sizes[name]

    def read(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        link = hf_hub_url(self.url.repo_id, self.repo_path(name), repo_type=self.url.repo_type, revision=self.sha, endpoint=constants.ENDPOINT)
        headers = build_hf_headers() | {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        try:
            response = http_backoff("GET", link, headers=headers, max_retries=4, base_wait_time=0.5)
        except Exception as e:  # noqa: BLE001 - transient errors were retried; report what is left
            raise CheckpointTransportError(f"{self.describe(name)}: reading {length} bytes at {offset} failed after retries ({e})", url=str(self.url), file=self.describe(name)) from e
        if response.status_code != 206 or len(response.content) != length:
            raise CheckpointFormatError(
                f"{self.describe(name)}: ranged read of {length} bytes at {offset} answered {response.status_code} "
                f"with {len(response.content)} bytes",
                url=str(self.url), file=self.describe(name),
            )
        return response.content

    def mapped(self, name: str) -> None:
        """Remote files are read, not mapped."""
        return None

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class HubFiles:
    """What :meth:`HubLocation.find` found to read: the pinned commit and the repo's files, and which to fetch."""

    sha: str = ""
    files: dict[str, RemoteFile] = field(default_factory=dict)  # every file of the repo at ``sha``
    sizes: dict[str, int] = field(default_factory=dict)  # the folder's files, for streaming reads
    paths: tuple[str, ...] = ()  # repo paths to download
    streaming: bool = False
    whole_folder: bool = False
    offline: bool = False  # HF_HUB_OFFLINE: read the cached snapshot


class HubLocation:
    """A repo (or a folder of it) on the Hub, at a branch, tag or commit."""

    def __init__(self, url: HubUrl, private: bool = True, snapshot: tuple[str, dict[str, RemoteFile]] | None = None):
        self.hub_url = url
        self.url = str(url)
        self.private = private
        self.api = HfApi(endpoint=constants.ENDPOINT)
        self._snapshot_memo = snapshot  # the repo at this revision, once asked (on the process that asked)

    def _in_folder(self, path: str) -> str | None:
        prefix = self.hub_url.folder_prefix
        return path[len(prefix) :] if path.startswith(prefix) and "/" not in path[len(prefix) :] else None

    def _snapshot(self) -> tuple[str, dict[str, RemoteFile]]:
        """The commit sha the revision points at, and every file of the repo (asked once per location object)."""
        if self._snapshot_memo is None:
            self._snapshot_memo = self._fetch_snapshot()
        return self._snapshot_memo

    def _fetch_snapshot(self) -> tuple[str, dict[str, RemoteFile]]:
        """Ask the Hub for the commit sha the revision points at, and every file of the repo with its size and digests."""
        with _hub_errors(self.hub_url):
            info = with_retries(
                lambda: self.api.repo_info(self.hub_url.repo_id, repo_type=self.hub_url.repo_type, revision=self.hub_url.revision, files_metadata=True),
                f"resolving {self.hub_url}",
            )
        files = {
            s.rfilename: RemoteFile(s.size or 0, getattr(s.lfs, "sha256", None) if s.lfs else None, s.blob_id)
            for s in info.siblings or []
        }
        return info.sha, files

    def find(self, *, checkpoint_files: list[str] | None = None, streaming: bool = False, whole_folder: bool = False) -> HubFiles:
        """Pin the revision to its commit and list what to read there (the files needed, or every file below)."""
        if constants.HF_HUB_OFFLINE and not whole_folder:
            return HubFiles(offline=True)
        sha, files = self._snapshot()
        if whole_folder:
            prefix = self.hub_url.folder_prefix
            paths = tuple(sorted(f for f in files if f.startswith(prefix)))
            if not paths:
                raise CheckpointNotFoundError(f"{self.url}: no such folder at commit {sha}", url=self.url)
            return HubFiles(sha, files, paths=paths, whole_folder=True)
        sizes = {name: f.size for path, f in files.items() if (name := self._in_folder(path)) is not None}
        if streaming:
            return HubFiles(sha, sizes=sizes, streaming=True)
        remote = HubFolder(self.hub_url, sha, sizes)
        names = files_to_fetch(set(sizes), lambda: remote.read(INDEX_FILE, 0, remote.size(INDEX_FILE)), self.url, checkpoint_files)
        return HubFiles(sha, files, paths=tuple(remote.repo_path(n) for n in names))

    def download(self, found: HubFiles) -> None:
        if found.paths:
            self._download(found.sha, list(found.paths), found.files)

    def folder(self, found: HubFiles) -> Folder:
        if found.offline:
            return self._open_cached(self.hub_url.revision or "main")
        if found.streaming:
            return HubFolder(self.hub_url, found.sha, found.sizes)
        if not found.whole_folder:
            return self._open_cached(found.sha)
        first = found.paths[0]
        cached = try_to_load_from_cache(self.hub_url.repo_id, first, revision=found.sha, repo_type=self.hub_url.repo_type)
        if not isinstance(cached, str):
            raise CheckpointTransportError(f"{self.url}: download incomplete (not in the Hugging Face cache)", url=self.url)
        snapshot = Path(cached[: -len(first)])
        return LocalFolder(snapshot / self.hub_url.subfolder, trusted_root=snapshot.parent.parent)

    def _download(self, sha: str, paths: list[str], files: dict[str, RemoteFile]) -> None:
        """Fetch ``paths`` at ``sha`` into the Hugging Face cache, checking each against the Hub's digests.

        Files download in parallel and each is hashed as soon as it is complete, so the check
        overlaps the other downloads instead of following them.
        """
        marker = cache_root() / "verified" / url_key(f"{self.hub_url.repo_type}/{self.hub_url.repo_id}@{sha}:{sorted(paths)}")
        verified = marker.exists()

        def fetch(path: str) -> None:
            local = with_retries(
                lambda: hf_hub_download(self.hub_url.repo_id, path, repo_type=self.hub_url.repo_type, revision=sha),
                f"downloading {self.hub_url}/{path}",
            )
            if not verified:
                self._verify_cached(Path(local), path, files[path])

        with _hub_errors(self.hub_url), concurrent.futures.ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
            list(pool.map(fetch, sorted(paths, key=lambda p: -files[p].size)))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def _verify_cached(self, local: Path, path: str, expected: RemoteFile) -> None:
        """The downloaded ``local`` copy of ``path`` must hash to what the Hub reported (sha256 for LFS, git blob sha1 otherwise)."""
        actual = _digest(local, expected)
        wanted = expected.sha256 or expected.git_sha1
        if wanted and actual != wanted:
            local.resolve().unlink(missing_ok=True)  # never leave a corrupt blob in the cache
            raise CheckpointFormatError(
                f"{self.hub_url}/{path}: downloaded bytes hash to {actual[:16]}... but the Hub reports {wanted[:16]}...: "
                "corrupted in transit; the cached copy was removed, try again",
                url=self.url, file=f"{self.url}/{path}",
            )

    def _open_cached(self, revision: str) -> Folder:
        """The cached snapshot at ``revision`` (a sha, or a ref the cache knows), found via its config.json."""
        config = try_to_load_from_cache(
            self.hub_url.repo_id, repo_path(self.hub_url, CONFIG_FILE), revision=revision, repo_type=self.hub_url.repo_type
        )
        if not isinstance(config, str):
            raise CheckpointNotFoundError(f"{self.hub_url}: not in the local Hugging Face cache at revision {revision}", url=self.url)
        folder = Path(config).parent
        snapshot = folder.parents[len(Path(self.hub_url.subfolder).parts) - 1] if self.hub_url.subfolder else folder
        return LocalFolder(folder, trusted_root=snapshot.parent.parent)

    # ---- publishing -----------------------------------------------------------------------

    def staging_dir(self, name: str) -> Path:
        return remote_staging_dir(self.url, name)

    def _branch(self) -> str:
        return self.hub_url.revision or "main"

    def _head(self) -> tuple[str, set[str]]:
        """Create the repo (private by default) and branch if missing; the branch head and its files."""
        repo, kind, branch = self.hub_url.repo_id, self.hub_url.repo_type, self._branch()
        self.api.create_repo(repo, repo_type=kind, private=self.private, exist_ok=True)
        self.api.create_branch(repo, repo_type=kind, branch=branch, exist_ok=True)
        info = self.api.repo_info(repo, repo_type=kind, revision=branch)
        return info.sha, {s.rfilename for s in info.siblings or []}

    def _operations(self, folder: Path, existing: set[str], card: dict[str, Any] | None) -> list:
        """Add every staged file (and the card); delete earlier checkpoint files this one replaces."""
        prefix = self.hub_url.folder_prefix
        new = {prefix + rel: folder / rel for rel in upload_order(folder)}
        operations: list = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(p)) for path, p in new.items()]
        readme = prefix + README
        if card is not None and readme not in new and (readme not in existing or self._card_is_ours(readme)):
            operations.append(CommitOperationAdd(readme, model_card(self.hub_url.repo_id, card).encode()))
        stale = [p for p in existing if p not in new and _is_checkpoint_file(p.removeprefix(prefix)) and p.startswith(prefix)]
        return operations + [CommitOperationDelete(path_in_repo=p) for p in stale]

    def _card_is_ours(self, readme: str) -> bool:
        link = hf_hub_url(self.hub_url.repo_id, readme, repo_type=self.hub_url.repo_type, revision=self._branch(), endpoint=constants.ENDPOINT)
        response = http_backoff("GET", link, headers=build_hf_headers(), max_retries=3)
        return response.status_code == 200 and CARD_MARKER in response.text

    def publish(self, folder: Path, name: str, *, options: PublishOptions = PublishOptions()) -> str:
        """One commit with every file of ``folder`` (and the card), tagged after ``name``; the staged copy is removed."""
        self.replace_with(folder, options=replace(options, message=options.message or f"checkpointer: {name}", tag=options.tag or _tag(name)))
        shutil.rmtree(folder, ignore_errors=True)
        return self.checkpoint(name).url

    def staging_folder(self) -> Path:
        return remote_staging_folder(self.url)

    def replace_with(self, folder: Path, *, options: PublishOptions = PublishOptions()) -> str:
        """ONE commit making ``folder``'s files the contents here (creating the repo and branch if missing).

        ``options.card``: a model card to add unless a README of the user's is there (None: no card);
        ``options.tag``: a tag to (re)point at the commit. ``folder`` is kept. Returns the commit's URL.
        """
        save_id = uuid.uuid4().hex
        message = options.message or f"checkpointer: upload {folder.name}"

        def push() -> str:
            self._snapshot_memo = None  # the branch head moves: a later read asks again
            commit = with_retries(lambda: self._commit_once(folder, message, options.card, save_id), f"pushing {folder} to {self.url}")
            if options.tag:
                self._retag(options.tag, commit)
            return commit

        explain = lambda e: str(_hub_error(self.hub_url, e)) if isinstance(e, HfHubHTTPError) else str(e)  # noqa: E731
        return self.commit_url(kept_on_failure(f"push to {self.url}", folder, push, explain))

    def commit_url(self, commit: str) -> str:
        """The Hub page of ``commit`` in this repo."""
        kind = "" if self.hub_url.repo_type == "model" else f"{self.hub_url.repo_type}s/"
        return f"{constants.ENDPOINT}/{kind}{self.hub_url.repo_id}/commit/{commit}"

    def _retag(self, tag: str, commit: str) -> None:
        if tag in {t.name for t in self.api.list_repo_refs(self.hub_url.repo_id, repo_type=self.hub_url.repo_type).tags}:
            self.api.delete_tag(self.hub_url.repo_id, tag=tag, repo_type=self.hub_url.repo_type)
        self.api.create_tag(self.hub_url.repo_id, tag=tag, revision=commit, repo_type=self.hub_url.repo_type)

    def _commit_once(self, folder: Path, message: str, card: dict[str, Any] | None, save_id: str) -> str:
        """Commit against the current head; if an earlier attempt already landed, return that commit."""
        head, existing = self._head()
        landed = self._find_landed(save_id)
        if landed:
            return landed
        info = self.api.create_commit(
            self.hub_url.repo_id,
            operations=self._operations(folder, existing, card),
            commit_message=message,
            commit_description=f"save-id: {save_id}",
            repo_type=self.hub_url.repo_type,
            revision=self._branch(),
            parent_commit=head,
        )
        return info.oid

    def _find_landed(self, save_id: str) -> str | None:
        commits = self.api.list_repo_commits(self.hub_url.repo_id, repo_type=self.hub_url.repo_type, revision=self._branch())
        for commit in commits[:5]:
            if save_id in (commit.message or ""):
                return commit.commit_id
        return None

    # ---- reading back and pruning ----------------------------------------------------------

    def checkpoint(self, name: str) -> HubLocation:
        return HubLocation(HubUrl(self.hub_url.repo_id, self.hub_url.repo_type, _tag(name), self.hub_url.subfolder), self.private)

    def subfolder(self, path: str) -> HubLocation:
        return HubLocation(self.hub_url.with_subfolder(path), self.private, self._snapshot_memo) if path else self

    def checkpoint_names(self) -> list[str]:
        try:
            refs = self.api.list_repo_refs(self.hub_url.repo_id, repo_type=self.hub_url.repo_type)
        except RepositoryNotFoundError:
            return []
        names = [t.name.replace("-", "_") for t in refs.tags]
        return sorted(n for n in names if CHECKPOINT_NAME.match(n))

    def read_file(self, path: str) -> bytes | None:
        link = hf_hub_url(self.hub_url.repo_id, repo_path(self.hub_url, path), repo_type=self.hub_url.repo_type, revision=self.hub_url.revision, endpoint=constants.ENDPOINT)
        response = http_backoff("GET", link, headers=build_hf_headers(), max_retries=4, base_wait_time=0.5)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise CheckpointTransportError(f"{self.hub_url}/{path}: the Hub answered {response.status_code}", url=self.url, file=f"{self.url}/{path}")
        return response.content

    def list_files(self) -> dict[str, int]:
        """Every file of this folder of the repo (subfolders included) with its size."""
        if constants.HF_HUB_OFFLINE:
            cached = self._open_cached(self.hub_url.revision or "main")
            return local_files(cached.root)
        _, remote = self._snapshot()
        prefix = self.hub_url.folder_prefix
        files = {p[len(prefix) :]: f.size for p, f in sorted(remote.items()) if p.startswith(prefix)}
        if not files:
            raise CheckpointNotFoundError(f"{self.hub_url}: no files there", url=self.url)
        return files

    def remove(self, name: str) -> None:
        """On the Hub a checkpoint is a tag; removing it drops the tag (history keeps the files)."""
        if not CHECKPOINT_NAME.match(name):
            raise CheckpointError(f"{self.checkpoint(name).url}: refusing to remove something that is not a checkpoint", url=self.url, file=self.checkpoint(name).url)
        self.api.delete_tag(self.hub_url.repo_id, tag=_tag(name), repo_type=self.hub_url.repo_type)


def _is_checkpoint_file(path: str) -> bool:
    """Files an earlier checkpoint at the same place wrote, which a new one replaces."""
    return path.startswith((f"{TRAINING_STATE_DIR}/", f"{ADAPTER_DIR}/")) or (
        "/" not in path and (path.endswith(".safetensors") or path in (INDEX_FILE, MANIFEST_FILE, ADAPTER_CONFIG_FILE))
    )


def _tag(name: str) -> str:
    """``epoch_3`` -> ``epoch-3`` (the Hub's tags for checkpoints)."""
    return name.replace("_", "-")
