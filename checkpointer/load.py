"""Loading: which checkpoint's files a load reads, checked on every rank, then read into the caller's tensors.

Full fine-tuning resumes from the resumed checkpoint's own weights; LoRA keeps the original
base (merged weights in a checkpoint already hold the adapter) and reads the adapter from
the resumed checkpoint. Every method here is collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from checkpointer import phases
from checkpointer.base_checkpoint import BaseCheckpoint
from checkpointer.dcp.hf_io import IOStats
from checkpointer.format.folder import Folder
from checkpointer.format.hf_files import CheckpointFiles, read_checkpoint_files
from checkpointer.format.manifest import Contents
from checkpointer.format.peft import ADAPTER_FILE
from checkpointer.mapping.file_views import file_views
from checkpointer.mapping.key_maps import KeyMap, adapter_key_map
from checkpointer.mapping.matching import Specs, match_for_load, model_specs_from_checkpoint
from checkpointer.mapping.pieces import Placement
from checkpointer.resume import ResumePoint
from checkpointer.storage.location import Location


@dataclass
class Loader:
    """Reads the weights of a job's base checkpoint, or of the checkpoint it resumes from, on every rank."""

    base: BaseCheckpoint
    resume: ResumePoint | None
    group: dist.ProcessGroup | None
    streaming: bool
    verify_checksums: bool
    last: IOStats | None = None  # the last read of weights

    @property
    def contents(self) -> Contents:
        """What the resumed checkpoint holds (nothing when not resuming)."""
        return self.resume.contents if self.resume is not None else Contents()

    def base_files(self) -> CheckpointFiles:
        """The base's files and headers, read on every rank and checked against its manifest (once per job)."""
        return self.base.checked_weight_files(self.group, verify_checksums=self.verify_checksums)

    def checked_files(self, folder: Folder, checkpoint_files: Sequence[str] | None = None) -> CheckpointFiles:
        """The checkpoint files in ``folder``, read on every rank and checked against its manifest."""
        return phases.check_files(folder, lambda: read_checkpoint_files(folder, checkpoint_files), self.group, verify_checksums=self.verify_checksums)

    def weight_files(self, adapter: bool) -> tuple[CheckpointFiles, str]:
        """The weights a load starts from and their URL: the resumed checkpoint's (full fine-tuning), else the base's."""
        if self.contents.weights and not adapter:
            return self.checked_files(self.resume.folder(self.group, self.streaming)), self.resume.location.url
        return self.base_files(), self.base.location.url

    def adapter_files(self, location: Location) -> tuple[CheckpointFiles, str]:
        """The PEFT adapter file at ``location``, opened (once per node) and checked, and its URL."""
        folder = phases.open_folder(location, self.group, streaming=self.streaming, checkpoint_files=[ADAPTER_FILE])
        return self.checked_files(folder, [ADAPTER_FILE]), location.url

    def resumed_adapter(self) -> Location:
        """Where the resumed checkpoint keeps its adapter (the contents must name one)."""
        return self.resume.location.subfolder(self.contents.adapter)

    def read(self, state_dict: dict[str, Any], files: CheckpointFiles, key_map: KeyMap, sources: dict[str, Placement] | None = None) -> None:
        """Fill ``state_dict`` (plain or sharded tensors, torchtune keys) in place from ``files`` (``sources``: already matched)."""
        self.last = phases.read(state_dict, files, key_map, self.group, sources)

    def read_whole(self, files: CheckpointFiles, where: str, key_map: KeyMap) -> dict[str, torch.Tensor]:
        """Every tensor of ``files`` (at URL ``where``) in full, with torchtune keys.

        Tensors stored as they are (see :mod:`checkpointer.mapping.file_views`) are views of
        their local file's copy-on-write map; the others are read.
        """

        def lay_out() -> tuple[Specs, dict[str, Placement], dict[str, torch.Tensor]]:
            specs = model_specs_from_checkpoint(key_map, files.tensors, where)
            sources = match_for_load(key_map, {key: shape for key, (_, shape) in specs.items()}, files.tensors, where)
            return specs, sources, file_views(key_map, files, specs, sources)

        specs, sources, views = phases.plan(lay_out, self.group)
        read = {key: torch.empty(shape, dtype=dtype) for key, (dtype, shape) in specs.items() if key not in views}
        self.read(read, files, key_map, sources)
        return {key: views[key] if key in views else read[key] for key in specs}

    def adapter_key_map(self) -> KeyMap:
        return adapter_key_map(self.base.key_map)
