"""A DCP SavePlanner that turns local shards into boxes of Hugging Face tensors.

Each rank emits one WriteItem per HF box that its shards hold: a contiguous block of
rows, or one whole expert (``pieces.shard_pieces``, the same pieces as loading, in reverse). The coordinator removes duplicates of
replicated data, checks that the boxes cover every HF tensor exactly, and returns the
plans; each rank then writes its own boxes in place (see ``storage_writer``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem

from checkpointer.dcp.one_entry import unwrapped
from checkpointer.dcp.wire import box_item
from checkpointer.errors import CheckpointMismatchError
from checkpointer.format.safetensors import TensorSpec
from checkpointer.mapping.boxes import Box, exact_cover
from checkpointer.mapping.key_maps import KeyMap
from checkpointer.mapping.local_shards import LocalShard, local_boxes
from checkpointer.mapping.pieces import Placement, shard_pieces


class HFSavePlanner(SavePlanner):
    """Plans writes of local shards as boxes of the HF tensors in ``specs``.

    ``subset``: the state dict's tensors may also hold HF tensors beyond ``specs`` (an expert
    tensor when one output file of an export holds only some of its experts); their pieces
    are left out. ``specs`` must still be covered exactly.
    """

    def __init__(self, key_map: KeyMap, specs: dict[str, TensorSpec], destinations: dict[str, Placement], subset: bool = False):
        self.key_map = key_map
        self.specs = specs
        self.destinations = destinations
        self.subset = subset
        self.views: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.state_dict: dict[str, Any] = {}

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None, is_coordinator: bool = False) -> None:
        self.state_dict = unwrapped(state_dict)

    def create_local_plan(self) -> SavePlan:
        self.views = {}
        items = [item for key, value in self.state_dict.items() for box in local_boxes(key, value) for item in self._items(key, box)]
        return SavePlan(items)

    def _items(self, key: str, shard: LocalShard) -> list[WriteItem]:
        return [
            self._item(self.specs[piece.hf_key], piece.offsets, piece.lengths, piece.view)
            for piece in shard_pieces(self.key_map, self.destinations[key], shard)
            if not self.subset or piece.hf_key in self.specs
        ]

    def _item(self, spec: TensorSpec, offsets: tuple[int, ...], sizes: tuple[int, ...], view: torch.Tensor) -> WriteItem:
        self.views[(spec.name, offsets)] = view
        return box_item(spec.name, offsets, sizes, tuple(spec.shape), spec.dtype)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans = dedup_save_plans(all_plans)
        chunks: dict[str, list[ChunkStorageMetadata]] = {name: [] for name in self.specs}
        for plan in plans:
            for item in plan.items:
                chunks[item.index.fqn].append(item.tensor_data.chunk)
        _check_coverage(self.specs, chunks)
        # The files' headers are the checkpoint's metadata. DCP pickles what is returned here to every
        # rank after the write, and nothing reads it: an empty one costs nothing to send.
        return plans, Metadata({})

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.views[(write_item.index.fqn, tuple(write_item.index.offset))]


def _check_coverage(specs: dict[str, TensorSpec], chunks: dict[str, list[ChunkStorageMetadata]]) -> None:
    """Every element of every HF tensor is written exactly once (no holes, no overlaps)."""
    for name, spec in specs.items():
        boxes = [Box(tuple(c.offsets), tuple(c.sizes)) for c in chunks[name]]
        covered = sum(box.numel for box in boxes)
        numel = math.prod(spec.shape)
        if covered != numel or not exact_cover(boxes, tuple(spec.shape)):
            raise CheckpointMismatchError(
                f"{name}: the ranks' shards cover {covered} of its {numel} elements "
                "(a key missing on some rank, or overlapping shards): refusing to write an incomplete file",
                key=name,
            )
