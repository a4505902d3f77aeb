"""What survives what: a rank killed at any point of a save, a full disk, two jobs, an error on one rank."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from crash_workers import load_then_break, resume_progress, save_then_break, try_to_save

from checkpointer import DistributedHFCheckpointer
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.storage.output_lock import OutputLock
from checkpointer.testing.multiprocess import RankFailed, run_on_ranks

MODEL = "llama3"


def _visible(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _assert_whole(folder: Path) -> None:
    """A complete checkpoint: manifest present, every hash right, loadable."""
    json.loads((folder / MANIFEST_FILE).read_text())
    state = DistributedHFCheckpointer(folder, folder.parent / "unused", MODEL.upper(), verify_checksums=True).load_checkpoint()
    assert state["model"]


@pytest.mark.parametrize(
    "spec,survivor",
    [
        ("save:write@1", "step_2"),  # a rank dies while writing its bytes
        ("save:hash@0", "step_2"),  # rank 0 dies after the writes, while hashing
        ("save:publish@0", "step_2"),  # rank 0 dies with a complete staging folder, before the rename
        ("save:after_publish@1", "step_4"),  # a rank dies after the checkpoint was published
    ],
)
def test_a_killed_rank_never_leaves_a_checkpoint_that_looks_complete(tiny_models, tmp_path, spec, survivor):
    base, out = tiny_models[MODEL], tmp_path / "out"
    with pytest.raises(RankFailed, match="died"):
        run_on_ranks(save_then_break, 2, str(base), str(out), MODEL.upper(), spec, timeout=120)
    visible = _visible(out)
    assert visible == sorted({"step_2", survivor}), visible  # nothing half-written under a real name
    for name in visible:
        _assert_whole(out / name)
    resumed = run_on_ranks(resume_progress, 2, str(base), str(out), MODEL.upper(), timeout=120)
    assert resumed[0] == resumed[1] == {"name": survivor, "step": int(survivor.split("_")[1])}


@pytest.mark.parametrize("spec", ["load:read@1:raise"])
def test_an_error_on_one_rank_during_load_raises_on_every_rank(tiny_models, tmp_path, spec):
    results = run_on_ranks(load_then_break, 2, str(tiny_models[MODEL]), str(tmp_path), MODEL.upper(), spec, timeout=120)
    assert all("failpoint load:read on rank 1" in r["error"] for r in results)  # the failure itself, not a timeout


@pytest.mark.parametrize("spec", ["save:write@0:raise", "save:hash@1:raise", "save:publish@0:raise"])
def test_an_error_on_one_rank_during_save_raises_on_every_rank(tiny_models, tmp_path, spec):
    out = tmp_path / "out"
    results = run_on_ranks(save_then_break, 2, str(tiny_models[MODEL]), str(out), MODEL.upper(), spec, timeout=120)
    point, target = spec.split(":raise")[0].split("@")
    assert all(f"failpoint {point} on rank {target}" in r["error"] for r in results), results  # not a timeout
    assert _visible(out) == ["step_2"]
    _assert_whole(out / "step_2")


def test_a_second_job_on_the_same_output_folder_is_refused(tiny_models, tmp_path):
    out = tmp_path / "out"
    lock = OutputLock(out)
    lock.acquire()  # this process plays the first job
    try:
        messages = run_on_ranks(try_to_save, 2, str(tiny_models[MODEL]), str(out), MODEL.upper(), timeout=120)
    finally:
        lock.release()
    assert all("another job is writing checkpoints here" in m for m in messages)
    assert _visible(out) == []
    saved = run_on_ranks(try_to_save, 2, str(tiny_models[MODEL]), str(out), MODEL.upper(), timeout=120)
    assert saved[0] == str(out / "epoch_0")  # once the first job is gone, the lock is free


@pytest.fixture
def small_disk(tiny_models, tmp_path):
    """A tmpfs room for one checkpoint and a half (needs the right to mount; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = 3 * sum(p.stat().st_size for p in tiny_models[MODEL].iterdir()) // 2
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_fails_cleanly_and_keeps_the_previous_checkpoint(tiny_models, small_disk):
    """The second save runs out of space mid-write: a clear error on every rank, no partial files."""
    base = tiny_models[MODEL]
    out = small_disk / "out"
    results = run_on_ranks(save_then_break, 2, str(base), str(out), MODEL.upper(), "", timeout=120)
    assert all("No space left on device" in r["error"] and "the disk is full" in r["error"] for r in results), results
    assert [p.name for p in out.iterdir() if p.name != ".checkpointer.lock"] == ["step_2"]  # partial files removed
    _assert_whole(out / "step_2")
