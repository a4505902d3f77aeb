"""``checkpointer push``: publish a local folder to the Hub as ONE commit, with a model card."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from checkpointer.cli.common import Checkpoint, Outcome, Timer, is_repo_id, model_types
from checkpointer.cli.verify import check
from checkpointer.errors import CheckpointArgumentError, CheckpointError, CheckpointFormatError
from checkpointer.format.model_card import card_info
from checkpointer.format.peft import ADAPTER_CONFIG_FILE
from checkpointer.storage.factory import make_location
from checkpointer.storage.hub_location import README, HubLocation
from checkpointer.storage.local import LocalLocation
from checkpointer.storage.location import PublishOptions
from checkpointer.storage.urls import HubUrl, parse_location


def push(
    local: str,
    to: str,
    *,
    revision: str | None = None,
    tag: str | None = None,
    private: bool = True,
    message: str | None = None,
    check_first: bool = True,
) -> Outcome:
    """Upload every file of the folder ``local`` to the Hub repo ``to`` in one commit; print the commit URL."""
    timer = Timer()
    folder = _local_folder(local, to)
    hub = HubLocation(_hub_url(to, revision), private=private)
    checkpoint = Checkpoint.open(local, "LOCAL")
    if check_first:
        _refuse_broken(checkpoint, local)
    card = None if README in checkpoint.files else _card(checkpoint, folder)
    url = hub.replace_with(folder, options=PublishOptions(card, message or f"checkpointer push: {folder.name}", tag))
    print(url)
    tagged = f" (tag {tag})" if tag else ""
    return Outcome(0, f"pushed {len(checkpoint.files)} files, {timer.rate(sum(checkpoint.files.values()))} to {hub.url}{tagged}: {url}")


def _local_folder(local: str, to: str) -> Path:
    location = make_location(local, "LOCAL")
    if not isinstance(location, LocalLocation):
        raise CheckpointArgumentError(
            f"LOCAL={local!r} is not a folder on this machine: push uploads a local folder; "
            f"to publish from another place use `checkpointer consolidate {local} --to {to}`",
            key="LOCAL",
        )
    return location.path


def _hub_url(to: str, revision: str | None) -> HubUrl:
    url = parse_location(to, "REPO")
    if not isinstance(url, HubUrl):
        raise CheckpointArgumentError(f"REPO={to!r}: push publishes to the Hub: give hf://namespace/repo (to write elsewhere use `checkpointer consolidate --to`)", url=to, key="REPO")
    if revision and url.revision and revision != url.revision:
        raise CheckpointArgumentError(f"REPO={to!r} names revision {url.revision!r} but --revision says {revision!r}: give one of them", url=to, key="--revision")
    return dataclasses.replace(url, revision=revision or url.revision)


def _refuse_broken(checkpoint: Checkpoint, local: str) -> None:
    problems = check(checkpoint).problems
    if problems:
        raise CheckpointFormatError(
            f"{local} is not whole ({len(problems)} problem(s); the first: {problems[0]}): "
            f"run `checkpointer verify {local}` to list them, or push anyway with --no-verify",
            url=str(local),
        )


def _card(checkpoint: Checkpoint, folder: Path) -> dict[str, Any]:
    """Model card fields from what the folder says of itself: manifest, config, adapter config, keys."""
    manifest = checkpoint.manifest() or {}
    config = checkpoint.config() or {}
    base = (checkpoint.read_json(ADAPTER_CONFIG_FILE) or {}).get("base_model_name_or_path")
    try:
        types = model_types(checkpoint.weights().tensors, config) if checkpoint.has_weights else []
    except CheckpointError:  # pushed with --no-verify
        types = []
    dtype = config.get("dtype") or config.get("torch_dtype") or ("adapter only" if not checkpoint.has_weights else None)
    base_model = base if is_repo_id(base) else None
    return card_info(manifest.get("name") or folder.name, base_model, " / ".join(types) or None, dtype, manifest.get("world_size", 1))
