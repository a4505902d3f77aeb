"""Collectives only in explicit phases: attributes answer on one rank without communication."""

from __future__ import annotations

import json

import pytest
from dist_workers import rank_zero_asks_before_and_after_open

from checkpointer import CheckpointError, DistributedHFCheckpointer
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.train.builders import build_model_from_dir


def test_rank_zero_alone_may_ask_whether_resuming(tiny_llama3, tmp_path):
    model = build_model_from_dir("LLAMA3", tiny_llama3)
    out = tmp_path / "out"
    saved = DistributedHFCheckpointer(tiny_llama3, out, "LLAMA3")
    saved.load_model(model)
    saved.save_checkpoint({"model": model.state_dict(), "progress": {"step": 3}}, epoch=0, step=3, intermediate_checkpoint=True)
    layers = json.loads((tiny_llama3 / "config.json").read_text())["num_hidden_layers"]

    results = run_on_ranks(rank_zero_asks_before_and_after_open, 2, str(tiny_llama3), str(out), "LLAMA3", timeout=120, pg_timeout=30)

    assert "open()" in results[0]["before"] and results[1]["before"] is None
    assert results[0]["answer"] == {"name": "step_3", "num_layers": layers} and results[1]["answer"] == {}


def test_attributes_raise_until_open_and_open_runs_once(tiny_llama3, tmp_path):
    checkpointer = DistributedHFCheckpointer(tiny_llama3, tmp_path / "out", "LLAMA3")
    for name in ("resuming", "resume_manifest", "config_dict", "key_map", "source_folder"):
        with pytest.raises(CheckpointError, match=r"call open\(\) on every rank"):
            getattr(checkpointer, name)
    assert checkpointer.open() is checkpointer and checkpointer.open().base is checkpointer.base
    assert checkpointer.resuming is False and checkpointer.resume_manifest is None
    assert checkpointer.config_dict == json.loads((tiny_llama3 / "config.json").read_text())
