"""The boxes of Hugging Face tensors that one rank's shard of a torchtune tensor covers.

Both DCP planners walk the same pieces: a load copies each HF box into its view of the
shard, a save writes each view out as that box. A dense tensor's shard is cut into row
runs (``row_runs``). A stacked expert tensor ``[E, F, D]`` is sharded on dim 0, so its shard
is a run of whole experts: each expert's rows go to its own HF tensor (per-expert layout)
or to box ``(e, rows, ...)`` of the fused 3-D one. Nothing is gathered; each element is in
exactly one piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from checkpointer.mapping.key_maps import PER_EXPERT, KeyMap, Rule, expert_key, stored_keys
from checkpointer.mapping.local_shards import LocalShard
from checkpointer.mapping.row_runs import local_view


@dataclass(frozen=True)
class Placement:
    """Where a torchtune tensor lives: its HF key, the rule that maps it, and its first HF row (fused parts).

    For a per-expert rule ``hf_key`` keeps a ``{}`` for the expert index; ``experts`` is the
    tensor's expert count (0 for other rules).
    """

    hf_key: str
    rule: Rule
    part_offset: int = 0
    experts: int = 0

    @property
    def hf_keys(self) -> list[str]:
        """The HF keys the tensor occupies (one per expert for a per-expert rule)."""
        return stored_keys(self.hf_key, self.rule, self.experts)


@dataclass(frozen=True)
class Piece:
    """HF tensor ``hf_key``'s box at ``offsets`` of ``lengths`` holds the elements of ``view`` (row-major)."""

    hf_key: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    view: torch.Tensor


def shard_pieces(key_map: KeyMap, placement: Placement, shard: LocalShard) -> list[Piece]:
    """The pieces of this rank's ``shard`` of a tensor placed at ``placement``."""
    local = shard.local
    if local.numel() == 0:
        return []
    if local.dim() == 0:
        return [Piece(placement.hf_key, (), (), local)]
    if not placement.rule.experts:
        return _row_pieces(key_map, placement, local, shard.offsets, placement.hf_key, ())
    pieces = []
    for index in range(shard.rows):
        expert = shard.first_row + index
        if placement.rule.experts == PER_EXPERT:
            pieces += _row_pieces(key_map, placement, local[index], shard.offsets[1:], expert_key(placement.hf_key, expert), ())
        else:
            pieces += _row_pieces(key_map, placement, local[index], shard.offsets[1:], placement.hf_key, (expert,))
    return pieces


def _row_pieces(
    key_map: KeyMap, placement: Placement, local: torch.Tensor, offsets: tuple[int, ...], hf_key: str, lead: tuple[int, ...]
) -> list[Piece]:
    """Pieces of ``local`` (whose row 0 is global row ``offsets[0]``), inside the HF box ``lead`` (an expert) of ``hf_key``."""
    start = offsets[0]
    pieces = []
    for run in key_map.runs(placement.rule, start, start + local.shape[0], placement.part_offset):
        view = local_view(local, run, start)
        pieces.append(
            Piece(
                hf_key,
                (*lead, run.hf_row, *offsets[1:]),
                (*(1 for _ in lead), run.count, *local.shape[1:]),
                view.unsqueeze(0) if lead else view,
            )
        )
    return pieces
