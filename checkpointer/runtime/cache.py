"""Where this process keeps local copies: downloads, staged saves, copies of another node's folders."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """Where remote checkpoints are downloaded to and remote saves are staged (``$CHECKPOINTER_CACHE``)."""
    return Path(os.environ.get("CHECKPOINTER_CACHE", Path.home() / ".cache" / "checkpointer"))


def url_key(url: str) -> str:
    """A short, stable folder name for a URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]
