"""How a contiguous range of torchtune rows maps onto rows of a Hugging Face tensor.

FSDP2 shards dim 0 into contiguous row ranges. For most tensors a tune row range is
the same HF row range (shifted by a part offset for fused HF tensors such as Phi-3's
``qkv_proj``). For q/k projections of models whose torchtune RoPE is interleaved, rows
are permuted within each head: tune row ``h*hd + 2j + a`` is HF row ``h*hd + a*hd/2 + j``.

A range is cut into :class:`RowRun` pieces, each one contiguous block of HF rows paired
with a view of the local tune tensor that holds the same values in the same order:
- whole heads: one block, viewed as ``(heads, hd/2, 2, ...)`` transposed to ``(heads, 2, hd/2, ...)``;
- a partial head: up to two blocks (a = 0 and a = 1), each a stride-2 view of tune rows.
Reading copies an HF block into its view; writing copies the view out in HF order.
No piece ever needs more than the rows of this shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from checkpointer.errors import CheckpointArgumentError


@dataclass(frozen=True)
class RowRun:
    """``count`` HF rows from ``hf_row`` hold tune rows from ``tune_row`` (global indices).

    ``step`` is the stride between consecutive tune rows (1 or 2). A positive
    ``head_dim`` marks a block of whole heads whose rows are permuted as described above.
    """

    hf_row: int
    count: int
    tune_row: int
    step: int = 1
    head_dim: int = 0


def identity_runs(start: int, stop: int, hf_offset: int = 0) -> list[RowRun]:
    """Tune rows ``[start, stop)`` are HF rows ``[start, stop) + hf_offset``."""
    return [RowRun(hf_offset + start, stop - start, start)] if stop > start else []


def rope_runs(start: int, stop: int, head_dim: int, hf_offset: int = 0) -> list[RowRun]:
    """Pieces for tune rows ``[start, stop)`` of a RoPE-permuted projection."""
    if head_dim % 2:
        raise CheckpointArgumentError(f"head_dim {head_dim} must be even for a RoPE permutation", key="head_dim")
    runs: list[RowRun] = []
    first_full = -(-start // head_dim) * head_dim
    last_full = stop // head_dim * head_dim
    if first_full >= last_full:  # the range lies inside one head, or spans one boundary
        for head_start in range(start // head_dim * head_dim, stop, head_dim):
            runs += _partial_head_runs(max(start, head_start), min(stop, head_start + head_dim), head_start, head_dim)
    else:
        runs += _partial_head_runs(start, first_full, first_full - head_dim, head_dim)
        runs.append(RowRun(first_full, last_full - first_full, first_full, 1, head_dim))
        runs += _partial_head_runs(last_full, stop, last_full, head_dim)
    return [RowRun(r.hf_row + hf_offset, r.count, r.tune_row, r.step, r.head_dim) for r in runs]


def _partial_head_runs(start: int, stop: int, head_start: int, head_dim: int) -> list[RowRun]:
    """Up to two stride-2 pieces for tune rows ``[start, stop)`` inside the head at ``head_start``."""
    if stop <= start:
        return []
    if start == head_start and stop == head_start + head_dim:
        return [RowRun(head_start, head_dim, head_start, 1, head_dim)]
    half = head_dim // 2
    lo, hi = start - head_start, stop - head_start
    runs = []
    for parity in (0, 1):
        j_first = (lo - parity + 1) // 2  # smallest j with 2j + parity >= lo
        j_last = (hi - 1 - parity) // 2  # largest j with 2j + parity < hi
        if j_first <= j_last:
            runs.append(
                RowRun(head_start + parity * half + j_first, j_last - j_first + 1, head_start + 2 * j_first + parity, 2)
            )
    return runs


def local_view(local: torch.Tensor, run: RowRun, first_local_row: int) -> torch.Tensor:
    """The view of ``local`` (whose row 0 is global tune row ``first_local_row``) that ``run`` covers.

    Its elements, in row-major order, are the HF block's elements in row-major order.
    """
    begin = run.tune_row - first_local_row
    if run.head_dim:
        block = local[begin : begin + run.count]
        heads = run.count // run.head_dim
        return block.view(heads, run.head_dim // 2, 2, *local.shape[1:]).transpose(1, 2)
    return local[begin : begin + (run.count - 1) * run.step + 1 : run.step]
