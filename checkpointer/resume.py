"""The published checkpoints of an ``output_dir``: listing them, resuming from the newest, pruning the oldest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from checkpointer import phases
from checkpointer.dcp.recipe_state import read_whole_training_state
from checkpointer.dcp.training_state import JsonMetadataReader, stored_keys
from checkpointer.format.folder import Folder
from checkpointer.format.manifest import MANIFEST_FILE, TRAINING_STATE_DIR, Contents, parse_manifest
from checkpointer.runtime.distributed import rank
from checkpointer.storage.location import Location

log = logging.getLogger(__name__)


def published_checkpoints(destination: Location) -> list[dict[str, Any]]:
    """The manifests of the complete checkpoints at ``destination``, oldest first, each with its ``name`` (one process)."""
    manifests = []
    for name in destination.checkpoint_names():
        location = destination.checkpoint(name)
        text = location.read_file(MANIFEST_FILE)
        if text:
            manifests.append(parse_manifest(text, location.url) | {"name": name})
    return sorted(manifests, key=lambda m: (m.get("created_ns", 0), m["name"]))


def newest_resumable(destination: Location) -> dict[str, Any] | None:
    """The manifest of the newest published checkpoint that holds training state (one process)."""
    resumable = [m for m in published_checkpoints(destination) if Contents.of(m).training_state]
    return resumable[-1] if resumable else None


@dataclass
class ResumePoint:
    """The checkpoint a job continues from: its manifest and where it is."""

    manifest: dict[str, Any]
    location: Location
    _folder: Folder | None = field(default=None, repr=False)

    @property
    def contents(self) -> Contents:
        return Contents.of(self.manifest)

    @classmethod
    def find(cls, destination: Location, group: dist.ProcessGroup | None) -> ResumePoint | None:
        """The newest resumable checkpoint at ``destination`` (collective: rank 0 lists, every rank gets the answer)."""
        manifest = phases.decide(lambda: newest_resumable(destination), group)
        if manifest is None:
            if rank(group) == 0:
                log.warning("resume_from_checkpoint: no checkpoint with training state in %s; starting fresh", destination.url)
            return None
        return cls(manifest, destination.checkpoint(manifest["name"]))

    def folder(self, group: dist.ProcessGroup | None, streaming: bool) -> Folder:
        """The checkpoint's weights folder on every rank (collective the first time; opened once)."""
        if self._folder is None:
            self._folder = phases.open_folder(self.location, group, streaming=streaming)
        return self._folder

    def load_training_state(self, state: dict[str, Any], group: dist.ProcessGroup | None) -> dict[str, Any]:
        """Fill ``state`` in place from this checkpoint's training state; drop entries it does not hold (collective)."""
        reader = self._training_state_reader(group)
        stored = phases.check(lambda: stored_keys(reader), group)
        for key in [k for k in state if not any(s == k or s.startswith(f"{k}.") for s in stored)]:
            del state[key]
        phases.read_training_state(state, reader, group)
        return state

    def whole_training_state(self, group: dist.ProcessGroup | None) -> dict[str, Any]:
        """The training state with full tensors, read by every rank on its own (collective around it)."""
        reader = self._training_state_reader(group)
        return phases.check(lambda: read_whole_training_state(reader), group)

    def _training_state_reader(self, group: dist.ProcessGroup | None) -> JsonMetadataReader:
        return JsonMetadataReader(phases.fetch_folder(self.location.subfolder(TRAINING_STATE_DIR), group))


def prune(destination: Location, keep: str, keep_last: int) -> None:
    """Remove the oldest checkpoints beyond ``keep_last``; never ``keep``, the one just saved (one process).

    ``keep`` counts as the newest whatever the other manifests' clocks say.
    """
    names = [m["name"] for m in published_checkpoints(destination) if m["name"] != keep]
    for name in names[: max(0, len(names) + 1 - keep_last)]:
        log.info("removing old checkpoint %s", destination.checkpoint(name).url)
        destination.remove(name)
