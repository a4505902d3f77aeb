"""Putting a folder at a location of each kind (local, memory://, the local Hub) for tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import fsspec

KINDS = ("local", "memory", "hub")


def use_private_cache(monkeypatch: Any, folder: Path) -> Path:
    """Point checkpointer's download cache (``CHECKPOINTER_CACHE``) at ``folder`` until ``monkeypatch`` undoes it."""
    monkeypatch.setenv("CHECKPOINTER_CACHE", str(folder))
    return folder


def unique_repo(prefix: str) -> str:
    """A fresh repo id on the test Hub."""
    return f"tester/{prefix}-{uuid.uuid4().hex[:8]}"


def upload_to_hub(folder: Path, repo: str) -> str:
    """Upload with plain huggingface_hub, as a user would; returns the commit sha."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="upload base model")
    return api.repo_info(repo).sha


def place(kind: str, folder: Path) -> str:
    """``folder``'s files at a new location of ``kind`` ("hub" needs the ``hub_env`` fixture); its path or URL."""
    if kind == "local":
        return str(folder)
    if kind == "memory":
        root = f"/placed/{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("memory").put(str(folder), root, recursive=True)
        return f"memory:/{root}"
    repo = unique_repo("placed")
    upload_to_hub(folder, repo)
    return f"hf://{repo}"
