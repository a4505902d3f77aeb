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


class S3Server:
    """moto's S3 server on a free loopback port; ``storage_options`` point s3fs at it."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "use_listings_cache": False, "skip_instance_cache": True}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 protocol server (moto, server mode) on loopback for the session."""
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """``s3_server`` with dummy credentials in the environment (inherited by spawned ranks)."""
    for name, value in s3_server.credentials.items():
        monkeypatch.setenv(name, value)
    yield s3_server
