"""A DCP LoadPlanner that reads Hugging Face tensors straight into this rank's shards.

For each torchtune tensor in the state dict it asks the key_map which HF boxes hold the
local shard's elements (``pieces.shard_pieces``: row runs, or whole experts) and emits one
ReadItem per box. The destination of each item is a view of the local shard, registered by number
in ``dest_index.index``; the storage reader copies the HF block into it, converting
dtype on the way. No full tensor is ever built.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from checkpointer.dcp.one_entry import unwrapped
from checkpointer.errors import CheckpointArgumentError
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.mapping.key_maps import KeyMap
from checkpointer.mapping.local_shards import LocalShard, local_boxes
from checkpointer.mapping.matching import match_for_load
from checkpointer.mapping.pieces import Piece, Placement, shard_pieces


class HFLoadPlanner(LoadPlanner):
    """Plans reads of HF safetensors rows into the local shards of a torchtune state dict."""

    def __init__(self, key_map: KeyMap, sources: dict[str, Placement] | None = None):
        """``sources``: each key's placement, already matched (else matched here against the whole state dict)."""
        self.key_map = key_map
        self.targets: list[torch.Tensor] = []
        self.state_dict: dict[str, Any] = {}
        self.sources = sources

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        files: CheckpointFiles = metadata.storage_data  # type: ignore[union-attr]
        self.state_dict = unwrapped(state_dict)
        if self.sources is None:
            shapes = {key: tuple(value.shape) for key, value in self.state_dict.items()}
            self.sources = match_for_load(self.key_map, shapes, files.tensors, files.folder.describe())

    def create_local_plan(self) -> LoadPlan:
        self.targets = []
        items = [item for key, value in self.state_dict.items() for box in local_boxes(key, value) for item in self._items(key, box)]
        return LoadPlan(items)

    def _items(self, key: str, shard: LocalShard) -> list[ReadItem]:
        return [self._item(key, shard, piece) for piece in shard_pieces(self.key_map, self.sources[key], shard)]

    def _item(self, key: str, shard: LocalShard, piece: Piece) -> ReadItem:
        self.targets.append(piece.view)
        zeros = torch.Size([0] * len(piece.lengths))
        return ReadItem(
            type=LoadItemType.TENSOR,
            dest_index=MetadataIndex(key, torch.Size(shard.offsets), len(self.targets) - 1),
            dest_offsets=zeros,
            storage_index=MetadataIndex(piece.hf_key, zeros),
            storage_offsets=torch.Size(piece.offsets),
            lengths=torch.Size(piece.lengths),
        )

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointArgumentError(f"{read_item.dest_index.fqn}: Hugging Face checkpoints hold tensors only", key=read_item.dest_index.fqn)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self.targets[read_item.dest_index.index]

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """Reads land in place in the shard; nothing to do."""
