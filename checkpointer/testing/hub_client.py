"""Pointing the ``huggingface_hub`` client at another Hub (a LocalHub), even after it was imported.

``HF_ENDPOINT`` and friends are read when huggingface_hub is imported, so besides the
environment (which child processes inherit) the module constants and the default ``HfApi``
behind the module-level functions (``hf_hub_download``, ``create_repo``...) are patched too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit


def _del_env(name: str, raising: bool = False) -> None:
    os.environ.pop(name, None)


def configure_hub_client(
    endpoint: str,
    token: str,
    hf_home: Path,
    set_env: Callable[[str, str], Any] = os.environ.__setitem__,
    del_env: Callable[..., Any] = _del_env,
    set_attr: Callable[[Any, str, Any], Any] = setattr,
) -> None:
    """Use ``endpoint`` with ``token`` and a cache in ``hf_home``; Xet and telemetry off.

    The setters default to plain assignment; tests pass monkeypatch's so it is undone.
    """
    hf_home = Path(hf_home)
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(hf_home),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    for name, value in env.items():
        set_env(name, value)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HF_XET_CACHE"):
        del_env(name, raising=False)

    from huggingface_hub import HfFileSystem, constants, hf_api

    host = urlsplit(endpoint).hostname or ""
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
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
            set_attr(constants, name, value)
    set_attr(hf_api.api, "endpoint", endpoint)
    HfFileSystem.clear_instance_cache()  # instances (and their listings cache) outlive tests otherwise


