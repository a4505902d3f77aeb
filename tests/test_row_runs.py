"""Row runs against torchtune's own RoPE permutation (convert_weights.hf_to_tune / tune_to_hf)."""

import random

import pytest
import torch
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf

from checkpointer.mapping.row_runs import identity_runs, local_view, rope_runs

HF_Q = "model.layers.0.self_attn.q_proj.weight"
TUNE_Q = "layers.0.attn.q_proj.weight"


def _permuted(hf: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """torchtune's HF -> tune permutation of a q projection."""
    dim = hf.shape[1]
    return hf_to_tune({HF_Q: hf}, num_heads=heads, num_kv_heads=heads, dim=dim, head_dim=head_dim)[TUNE_Q]


def _ranges(rows: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    picks = [(0, rows), (0, 1), (rows - 1, rows)]
    for _ in range(count):
        a = rng.randrange(rows)
        picks.append((a, rng.randrange(a + 1, rows + 1)))
    return picks


@pytest.mark.parametrize("heads,head_dim", [(4, 8), (9, 8), (2, 16), (3, 2)])
def test_reading_hf_blocks_into_views_gives_torchtunes_rows(heads, head_dim):
    hf = torch.arange(heads * head_dim * 5, dtype=torch.float32).reshape(heads * head_dim, 5)
    tune = _permuted(hf, heads, head_dim)
    for start, stop in _ranges(hf.shape[0], 60, seed=heads * head_dim):
        local = torch.full((stop - start, 5), -1.0)
        for run in rope_runs(start, stop, head_dim):
            view = local_view(local, run, start)
            view.copy_(hf[run.hf_row : run.hf_row + run.count].reshape(view.shape))
        assert torch.equal(local, tune[start:stop]), (start, stop)


@pytest.mark.parametrize("heads,head_dim", [(4, 8), (9, 8), (3, 2)])
def test_views_written_in_hf_order_rebuild_the_hf_tensor(heads, head_dim):
    tune = torch.randn(heads * head_dim, 3)
    dim = tune.shape[1]
    hf_expected = tune_to_hf({TUNE_Q: tune}, num_heads=heads, num_kv_heads=heads, dim=dim, head_dim=head_dim)[HF_Q]
    for start, stop in _ranges(tune.shape[0], 40, seed=7):
        hf = torch.full_like(hf_expected, float("nan"))
        for run in rope_runs(start, stop, head_dim):
            block = local_view(tune[start:stop], run, start).contiguous()
            hf[run.hf_row : run.hf_row + run.count] = block.reshape(run.count, dim)
        assert torch.equal(hf[~hf.isnan().any(1)], hf_expected[_hf_rows(start, stop, head_dim)])


def _hf_rows(start: int, stop: int, head_dim: int) -> list[int]:
    """HF rows that tune rows [start, stop) map to, ascending (tune row h*hd+2j+a -> h*hd+a*hd/2+j)."""
    rows = []
    for t in range(start, stop):
        h, r = divmod(t, head_dim)
        rows.append(h * head_dim + (r % 2) * (head_dim // 2) + r // 2)
    return sorted(rows)


def test_runs_never_cover_a_row_twice_and_cover_every_row():
    for start, stop in _ranges(72, 100, seed=3):
        rows = [run.tune_row + i * run.step for run in rope_runs(start, stop, 8) for i in range(run.count)]
        assert sorted(rows) == list(range(start, stop))


def test_whole_heads_are_one_block():
    runs = rope_runs(16, 48, 8)
    assert len(runs) == 1 and runs[0].head_dim == 8 and runs[0].count == 32


def test_identity_runs_shift_by_part_offset():
    assert identity_runs(3, 7, hf_offset=10)[0].hf_row == 13
    assert identity_runs(5, 5) == []


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="head_dim 7"):
        rope_runs(0, 7, 7)
