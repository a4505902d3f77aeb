"""Pytest fixtures for a LocalHub: ``local_hub`` (one server per session) and ``hub_env`` (client pointed at it).

Load with ``pytest_plugins = ["checkpointer.testing.pytest_plugin"]`` in a ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from checkpointer.testing.hub_server import LocalHub


def use_local_hub(monkeypatch: pytest.MonkeyPatch, hub: LocalHub, hf_home: Path) -> None:
    """Point ``huggingface_hub`` (environment and already-imported constants) at ``hub``, Xet and telemetry off.

    ``HF_ENDPOINT`` and friends are read when huggingface_hub is imported, so the module constants and the
    default ``HfApi`` behind the module-level functions (``hf_hub_download``, ``create_repo``...) are patched too.
    """
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HOME": str(hf_home),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HF_XET_CACHE"):
        monkeypatch.delenv(name, raising=False)

    from huggingface_hub import HfFileSystem, constants, hf_api

    host = urlsplit(hub.endpoint).hostname or ""
    values = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_XET_CACHE": str(hf_home / "xet"),
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    HfFileSystem.clear_instance_cache()  # instances (and their listings cache) outlive tests otherwise


@pytest.fixture(scope="session")
def local_hub() -> Iterator[LocalHub]:
    """A LocalHub on a free loopback port, shared by the whole session."""
    with LocalHub() as hub:
        yield hub


@pytest.fixture
def hub_env(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """``local_hub``, with huggingface_hub pointed at it and a fresh ``HF_HOME``; yields the hub."""
    local_hub.clear_faults()
    use_local_hub(monkeypatch, local_hub, tmp_path / "hf_home")
    yield local_hub
    local_hub.clear_faults()
    from huggingface_hub import HfFileSystem

    HfFileSystem.clear_instance_cache()
