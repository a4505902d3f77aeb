"""The base model a job starts from, as every rank opened it: its files, config.json and key map."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch.distributed as dist

from checkpointer import phases
from checkpointer.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from checkpointer.format.folder import Folder, LocalFolder
from checkpointer.format.hf_files import CONFIG_FILE, CheckpointFiles, read_checkpoint_files
from checkpointer.format.hf_output import copy_support_files
from checkpointer.format.model_config import ModelConfig
from checkpointer.mapping.key_maps import KeyMap, get_key_map
from checkpointer.runtime.cache import cache_root, url_key
from checkpointer.storage.location import Location

_MAX_CONFIG_BYTES = 16 * 2**20  # real configs are a few KB


@dataclass
class BaseCheckpoint:
    """The base checkpoint (``checkpoint_dir``): where it is, its folder, its config.json and the key map it implies."""

    location: Location
    folder: Folder
    config: dict[str, Any]
    key_map: KeyMap
    checkpoint_files: list[str] | None
    _weight_files: CheckpointFiles | None = field(default=None, repr=False)
    _checked_files: tuple[CheckpointFiles, bool] | None = field(default=None, repr=False)  # and whether its hashes were verified

    @classmethod
    def open(
        cls, location: Location, model_type: Any, checkpoint_files: list[str] | None, *, streaming: bool, group: dist.ProcessGroup | None
    ) -> BaseCheckpoint:
        """Open the base on every rank (collective: remote bases are fetched once per node, or streamed)."""
        folder = phases.open_folder(location, group, streaming=streaming, checkpoint_files=checkpoint_files)
        config = phases.check(lambda: read_config(folder), group).raw
        return cls(location, folder, config, get_key_map(model_type, ModelConfig.from_dict(config)), checkpoint_files)

    def weight_files(self) -> CheckpointFiles:
        """The weight files and their headers as this rank read them (read once: loads and saves share them)."""
        if self._weight_files is None:
            self._weight_files = read_checkpoint_files(self.folder, self.checkpoint_files)
        return self._weight_files

    def checked_weight_files(self, group: dist.ProcessGroup | None, *, verify_checksums: bool) -> CheckpointFiles:
        """The weight files, checked against the base's manifest on every rank (collective the first time).

        Checked once, as the headers are read once: a job's later loads reuse both (unless they
        ask for hashes that were not verified yet).
        """
        if self._checked_files is None or (verify_checksums and not self._checked_files[1]):
            self._checked_files = phases.check_files(self.folder, self.weight_files, group, verify_checksums=verify_checksums), verify_checksums
        return self._checked_files[0]

    @cached_property
    def weight_map(self) -> dict[str, str] | None:
        """The tensor -> file map that saves follow; None if the base's weights cannot be read.

        A base of one file without an index has no split to follow: ``max_shard_size`` decides.
        Worked out once (this process): every save of a job follows the same map.
        """
        try:
            files = self.weight_files()
        except CheckpointError:
            return None
        if files.weight_map is None and len(files.files) == 1:
            return None
        return {key: entry.file for key, entry in files.tensors.items()}

    def support_dir(self, group: dist.ProcessGroup | None) -> Path:
        """A local folder with the config, tokenizer and generation files (collective: copied once per node)."""
        if isinstance(self.folder, LocalFolder):
            return self.folder.root
        target = cache_root() / "support" / url_key(self.location.url)

        def copy() -> None:
            target.mkdir(parents=True, exist_ok=True)
            copy_support_files(self.folder, target)
            (target / CONFIG_FILE).write_bytes(self.folder.read(CONFIG_FILE, 0, self.folder.size(CONFIG_FILE)))

        phases.once_per_node(copy, group)
        return target


def read_config(folder: Folder) -> ModelConfig:
    """``config.json`` of ``folder``, size-checked and parsed (one process)."""
    if not folder.exists(CONFIG_FILE):
        raise CheckpointNotFoundError(f"{folder.describe(CONFIG_FILE)}: missing; the model's dimensions come from it", file=folder.describe(CONFIG_FILE))
    size = folder.size(CONFIG_FILE)
    if size > _MAX_CONFIG_BYTES:
        raise CheckpointFormatError(f"{folder.describe(CONFIG_FILE)}: {size} bytes is too large for a config.json", file=folder.describe(CONFIG_FILE))
    return ModelConfig.from_json(folder.read(CONFIG_FILE, 0, size), folder.describe(CONFIG_FILE))
