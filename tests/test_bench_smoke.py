"""The benchmark's code path, once, on a ~1M-parameter model with 2 ranks: it cannot silently rot.

No timing is asserted: only that every method ran, moved the right bytes and made it into the table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.methods import METHODS
from bench.models import SIZES
from bench.report import ratios_table, results_table, verdicts
from bench.run import main, run_size
from checkpointer import ModelConfig


def test_benchmark_runs_every_method_on_two_ranks(tmp_path):
    measured = run_size("1m", worlds=[2], reps=1, methods=list(METHODS), work=tmp_path)
    results = measured.results
    config = ModelConfig.from_dict(SIZES["1m"].config_fields())
    methods = [key for key, m in METHODS.items() if m.applies(2, config)]  # not FSDP2 over TP 2: it needs 4 ranks

    assert sorted(r.key for r in results) == sorted(methods) and "load/ours_tp" in methods
    assert {r.key: r.check for r in results} == dict.fromkeys(methods, "ok")  # checksums agree, every byte written
    assert all(r.moved_share <= 1.05 for r in results if r.key.endswith("_tp"))  # TP ranks move only their share
    table = "\n".join(results_table(results))
    assert all(f"| {key} |" in table for key in methods)
    assert "-" not in ratios_table(results)[-1].split("|", 3)[3]  # every ratio has both of its methods
    assert ratios_table(results, how="paired") == ratios_table(results)  # one repetition: its ratio is the ratio of medians
    assert [(g.size, g.world) for g in measured.groups] == [("1m", 2)]
    assert {v.target for v in verdicts(results)} >= {"load at most 1.05x the preadv floor", "save at most 1.1x the durable floor (save_file + fsync)"}


def test_a_cuda_run_needs_a_gpu_per_rank_and_is_refused_before_anything_is_written(tmp_path):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    argv = ["--device", "cuda", "--size", "1m", "--worlds", "1", str(gpus + 1), "--work", str(tmp_path), "--results", "-", "--no-remote"]
    with pytest.raises(SystemExit, match=f"^--device cuda: --worlds 1 {gpus + 1} needs {gpus + 1} GPUs, this machine has {gpus}$"):
        main(argv)
    assert list(tmp_path.iterdir()) == []  # no base model, no report


def test_the_gpu_machine_script_rehearses_here_every_step_it_takes_there(tmp_path):
    """bench/device.sh on the CPU: the GPU case of the async-save test is skipped, the run and its report happen."""
    out = tmp_path / "out"
    settings = {"BENCH_DEVICE": "cpu", "SIZES": "1m", "REPS": "1", "OUT": str(out), "WORK": str(tmp_path / "work")}
    settings |= {"PYTHON": sys.executable, "WHEELS": str(tmp_path / "none")}  # this venv has what the script needs
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["bash", "bench/device.sh"], cwd=root, env=os.environ | settings, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "skipped" in (out / "tests.txt").read_text() and " passed" in (out / "tests.txt").read_text()
    report = (out / "RESULTS-cpu.md").read_text()
    assert "async save blocks at most 10% of a full save: save/ours_async" in report and "1m W=1" in report
    assert (out / "last-run-cpu.json").exists() and (out / "machine.txt").exists()


def _spans(table: str) -> dict[str, list[tuple[float, float]]]:
    """A timeline table's rows: step -> each rank's (start, end) in ms (None where the rank has no such step)."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 1 and "-" in cells[1] and cells[1][0].isdigit():
            rows[cells[0]] = [tuple(map(float, c.split("-"))) if c != "-" else None for c in cells[1:]]
    return rows


def test_a_timeline_times_every_step_of_a_save_and_a_load_on_every_rank(tmp_path):
    run_size("1m", worlds=[2], reps=2, methods=["load/floor"], work=tmp_path, timeline="save/ours")
    run_size("1m", worlds=[2], reps=2, methods=["load/floor"], work=tmp_path, timeline="load/ours")
    save = _spans((tmp_path / "timeline-save-ours-base-1m-w2.md").read_text())
    load = _spans((tmp_path / "timeline-load-ours-base-1m-w2.md").read_text())

    assert "medians of 2" in (tmp_path / "timeline-save-ours-base-1m-w2.md").read_text()
    assert all(len(spans) == 2 for spans in save.values())
    every_rank = ["save", "DCP save of the weights", "local plan", "boxes written and fsynced", "published (rank 0, collective)"]
    assert all(save[step][r] is not None for step in every_rank for r in (0, 1))
    assert save["global plan (coordinator)"][1] is None and save["manifest, fsync, rename (rank 0)"][1] is None
    for r in (0, 1):  # each step inside the one that calls it, in the order a save takes them
        outer, written = save["DCP save of the weights"][r], save["boxes written and fsynced"][r]
        assert outer[0] <= save["local plan"][r][0] <= save["local plan"][r][1] <= written[0] <= written[1] <= outer[1]
        assert outer[1] <= save["published (rank 0, collective)"][r][0] <= save["save"][r][1]
    assert save["local plan"][0][1] <= save["global plan (coordinator)"][0][0] <= save["files created (coordinator)"][0][0]
    assert all(load[step][r] is not None for step in ("DCP load of the weights", "read plan", "shards read") for r in (0, 1))
    assert "save" not in load
