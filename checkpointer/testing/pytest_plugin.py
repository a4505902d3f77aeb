"""Pytest fixtures for a LocalHub: ``local_hub`` (one server per session) and ``hub_env`` (client pointed at it).

Load with ``pytest_plugins = ["checkpointer.testing.pytest_plugin"]`` in a ``conftest.py``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest

from checkpointer.testing.fault_proxy import FaultProxy
from checkpointer.testing.hub_client import configure_hub_client
from checkpointer.testing.hub_server import LocalHub


def use_local_hub(monkeypatch: pytest.MonkeyPatch, hub: LocalHub, hf_home: Path) -> None:
    """Point ``huggingface_hub`` at ``hub`` for one test (undone afterwards); see ``configure_hub_client``."""
    configure_hub_client(hub.endpoint, hub.token, hf_home, monkeypatch.setenv, monkeypatch.delenv, monkeypatch.setattr)


@pytest.fixture(scope="session")
def local_hub() -> Iterator[LocalHub]:
    """A LocalHub on a free loopback port, shared by the whole session."""
    with LocalHub() as hub:
        yield hub


@contextlib.contextmanager
def hub_environment(monkeypatch: pytest.MonkeyPatch, hub: LocalHub, hf_home: Path) -> Iterator[LocalHub]:
    """``hub`` without faults, with huggingface_hub pointed at it and ``hf_home`` as ``HF_HOME``, for a block."""
    hub.clear_faults()
    use_local_hub(monkeypatch, hub, hf_home)
    try:
        yield hub
    finally:
        hub.clear_faults()
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub_env(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """``local_hub``, with huggingface_hub pointed at it and a fresh ``HF_HOME``; yields the hub."""
    with hub_environment(monkeypatch, local_hub, tmp_path / "hf_home") as hub:
        yield hub


class S3Server:
    """moto's S3 server on a free loopback port, behind a proxy that can inject faults.

    ``storage_options`` point s3fs at the proxy; ``inject_fault`` queues a fault there.
    """

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.proxy = FaultProxy(f"http://{host}:{port}").start()
        self.endpoint = self.proxy.endpoint
        self.credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.inject_fault = self.proxy.inject_fault
        self.clear_faults = self.proxy.faults.clear

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "use_listings_cache": False, "skip_instance_cache": True}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def stop(self) -> None:
        self.proxy.stop()
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
    s3_server.clear_faults()
    yield s3_server
    s3_server.clear_faults()
