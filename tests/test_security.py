"""Security: no code runs from a checkpoint, tokens stay secret, nothing outside output_dir is touched,
and a load reads only the files the index names."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import stat
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from places import upload_to_hub
from saves import save_steps

from checkpointer import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, DistributedHFCheckpointer
from checkpointer.dcp.training_state import METADATA_FILE, TRAINING_STATE_DIR
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.train.builders import build_model_from_dir

MODEL_TYPE = "LLAMA3"  # the type of tiny_llama3


class _CreatesMarker:
    """Unpickling this object creates ``marker``: what a hostile pickle would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _loaded(base: Path, out: Path, **kwargs: Any) -> tuple[DistributedHFCheckpointer, torch.nn.Module]:
    """A model loaded from ``base`` and its checkpointer (one process)."""
    model = build_model_from_dir(MODEL_TYPE, base)
    checkpointer = DistributedHFCheckpointer(base, out, MODEL_TYPE, **kwargs)
    checkpointer.load_model(model)
    return checkpointer, model


def _tree(folder: Path) -> dict[str, tuple[int, bytes, float]]:
    """Every path under ``folder`` (not following symlinks): mode, content of files, mtime."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {
        str(p.relative_to(folder)): (p.lstat().st_mode, p.read_bytes() if p.is_file() and not p.is_symlink() else b"", p.lstat().st_mtime)
        for p in paths
    }


# ---- training state: JSON metadata, weights_only values ---------------------------------------------


@pytest.fixture
def resumable(tiny_llama3: Path, tmp_path: Path) -> Path:
    """An output folder holding one checkpoint with training state (progress.step = 3); returns the folder."""
    out = tmp_path / "out"
    checkpointer, model = _loaded(tiny_llama3, out)
    state = {"model": model.state_dict(), "progress": {"step": 3}, "optimizer": {"m": torch.arange(4.0)}}
    checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
    return out


def _resume(base: Path, out: Path) -> dict[str, Any]:
    state = {"progress": {"step": 0}, "optimizer": {"m": torch.zeros(4)}}
    return DistributedHFCheckpointer(base, out, MODEL_TYPE, resume_from_checkpoint=True).load_training_state(state)


def _rehash(checkpoint: Path, names: list[str]) -> None:
    """Record the new size and sha256 of ``names`` in the manifest, as a careful attacker would."""
    manifest_path = checkpoint / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    for name in names:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.chmod(0o644)
    manifest_path.write_text(json.dumps(manifest))


def _plant_pickle(checkpoint: Path, fqn: str, marker: Path) -> None:
    """Replace the training-state bytes entry ``fqn`` with a pickle that creates ``marker``; keep the manifest consistent."""
    payload = io.BytesIO()
    torch.save(_CreatesMarker(marker), payload)
    metadata_path = checkpoint / TRAINING_STATE_DIR / METADATA_FILE
    metadata = json.loads(metadata_path.read_text())
    entry = next(e for e in metadata["storage_data"] if e["fqn"] == fqn)
    data_path = checkpoint / TRAINING_STATE_DIR / entry["path"]
    entry["start"], entry["length"] = data_path.stat().st_size, len(payload.getvalue())
    data_path.chmod(0o644)
    with data_path.open("ab") as f:
        f.write(payload.getvalue())
    metadata_path.chmod(0o644)
    metadata_path.write_text(json.dumps(metadata))
    _rehash(checkpoint, [f"{TRAINING_STATE_DIR}/{entry['path']}", f"{TRAINING_STATE_DIR}/{METADATA_FILE}"])


def test_a_pickle_in_the_training_state_never_runs(resumable: Path, tiny_llama3: Path, tmp_path: Path) -> None:
    """A ``.distcp`` bytes entry replaced by a hostile pickle is refused by weights_only loading."""
    assert _resume(tiny_llama3, resumable)["progress"]["step"] == 3  # the entry is read on resume
    control, marker = tmp_path / "control", tmp_path / "marker"
    payload = io.BytesIO()
    torch.save(_CreatesMarker(control), payload)
    torch.load(io.BytesIO(payload.getvalue()), weights_only=False)
    assert control.exists()  # such a payload does run when unpickled unsafely

    _plant_pickle(resumable / "epoch_0", "progress.step", marker)
    with pytest.raises(CheckpointError, match="Unsupported global"):
        _resume(tiny_llama3, resumable)
    assert not marker.exists(), "the hostile pickle ran"


def test_a_refused_pickle_is_named_and_never_advised_to_be_trusted(resumable: Path, tiny_llama3: Path, tmp_path: Path) -> None:
    _plant_pickle(resumable / "epoch_0", "progress.step", tmp_path / "marker")
    with pytest.raises(CheckpointFormatError, match="progress.step") as info:
        _resume(tiny_llama3, resumable)
    assert "weights_only` set to `False`" not in str(info.value) and "Unsupported global" in str(info.value)


def test_a_pickled_metadata_file_is_never_read(resumable: Path, tiny_llama3: Path, tmp_path: Path) -> None:
    """DCP's default ``.metadata`` is a pickle: one planted beside (or instead of) the JSON is ignored."""
    marker = tmp_path / "marker"
    folder = resumable / "epoch_0" / TRAINING_STATE_DIR
    (folder / ".metadata").write_bytes(pickle.dumps(_CreatesMarker(marker)))
    assert _resume(tiny_llama3, resumable)["progress"]["step"] == 3
    (folder / METADATA_FILE).unlink()
    with pytest.raises(CheckpointNotFoundError, match=f"{METADATA_FILE}: missing: this is not a checkpointer training state"):
        _resume(tiny_llama3, resumable)
    assert not marker.exists(), "the pickled .metadata was unpickled"
    pickle.loads((folder / ".metadata").read_bytes())
    assert marker.exists()  # the planted file does run when unpickled


# ---- the token --------------------------------------------------------------------------------------


def _files_holding(folder: Path, secret: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_the_token_never_appears_in_logs_errors_or_pushed_files(
    hub_env: Any, tiny_llama3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, private_cache: Path
) -> None:
    from huggingface_hub import snapshot_download

    secret, owner = f"hf_secret_{uuid.uuid4().hex}", f"owner-{uuid.uuid4().hex[:8]}"
    monkeypatch.setitem(hub_env.tokens, secret, owner)
    monkeypatch.setenv("HF_TOKEN", secret)
    caplog.set_level(logging.DEBUG)
    for name in ("checkpointer", "huggingface_hub", "urllib3", "httpx", "httpcore", "filelock", "fsspec"):
        caplog.set_level(logging.DEBUG, logger=name)
    base, out = f"{owner}/base", f"{owner}/run"
    upload_to_hub(tiny_llama3, base)

    model = build_model_from_dir(MODEL_TYPE, tiny_llama3)
    checkpointer = DistributedHFCheckpointer(f"hf://{base}", f"hf://{out}", MODEL_TYPE)
    checkpointer.load_model(model)
    checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    errors: list[BaseException] = []
    hub_env.inject_fault("POST", rf"^/api/models/{out}/commit/", status=500, times=50)
    for attempt in (
        lambda: checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1),
        lambda: DistributedHFCheckpointer(f"hf://{owner}/missing", tmp_path / "o", MODEL_TYPE).load_checkpoint(),
        lambda: DistributedHFCheckpointer(f"hf://{base}@nope", tmp_path / "o", MODEL_TYPE).load_checkpoint(),
    ):
        with pytest.raises(CheckpointError) as info:
            attempt()
        errors.append(info.value)
    hub_env.clear_faults()

    assert hub_env.commits(out)[0]["author"] == owner  # the push did use the token
    assert "saved epoch_0:" in caplog.text and "huggingface_hub" in {r.name.split(".")[0] for r in caplog.records}
    assert secret not in caplog.text
    for error in errors:
        assert secret not in "".join(traceback.format_exception(error)), type(error).__name__
    pushed = Path(snapshot_download(out))
    assert {"README.md", "config.json", MANIFEST_FILE} <= {p.name for p in pushed.iterdir()}
    assert _files_holding(pushed, secret.encode()) == []
    kept = Path(str(errors[0]).rsplit("kept at ", 1)[1])  # the staged copy of the failed push
    assert kept.is_relative_to(private_cache) and (kept / MANIFEST_FILE).is_file()
    assert _files_holding(private_cache, secret.encode()) == []
    assert all(secret not in c["title"] + c["message"] for c in hub_env.commits(out))


# ---- file modes ---------------------------------------------------------------------------------------


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def saved_under_umask_0(tiny_llama3: Path, tmp_path: Path) -> Path:
    """An output folder (created by the save) with one checkpoint, written under ``umask(0)``."""
    out = tmp_path / "out"
    with _umask(0):
        checkpointer, model = _loaded(tiny_llama3, out)
        state = {"model": model.state_dict(), "progress": {"step": 1}}
        checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
        (tmp_path / "probe").touch()
    assert (tmp_path / "probe").stat().st_mode & stat.S_IWOTH  # the umask did let new files be world-writable
    return out


def _world_writable(paths: list[Path]) -> list[str]:
    return [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & stat.S_IWOTH]


def test_saved_files_are_not_world_writable_whatever_the_umask(saved_under_umask_0: Path) -> None:
    paths = list(saved_under_umask_0.rglob("*"))
    assert any(p.name.endswith(".safetensors") for p in paths) and any(TRAINING_STATE_DIR in p.parts for p in paths)
    assert _world_writable(paths) == []


def test_an_output_dir_created_by_a_save_is_not_world_writable(saved_under_umask_0: Path) -> None:
    assert _world_writable([saved_under_umask_0]) == []


# ---- nothing outside output_dir -------------------------------------------------------------------------


def test_a_checkpoint_name_that_is_a_symlink_out_of_output_dir_is_refused(
    tiny_llama3: Path, saved_llama3: Path, tmp_path: Path
) -> None:
    outside, out = tmp_path / "outside", tmp_path / "out"
    shutil.copytree(saved_llama3, outside)
    out.mkdir()
    (out / "epoch_0").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    checkpointer, model = _loaded(tiny_llama3, out)
    with pytest.raises(CheckpointError, match="epoch_0: exists and was not written by checkpointer; refusing to replace it"):
        checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    assert (out / "epoch_0").is_symlink() and (out / "epoch_0").resolve() == outside.resolve()
    assert _tree(outside) == before


def test_pruning_never_deletes_a_folder_without_checkpointers_manifest(tiny_llama3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "step_2").mkdir(parents=True)
    (out / "step_2" / "notes.txt").write_text("mine, no manifest")
    before = _tree(out / "step_2")
    checkpointer, model = _loaded(tiny_llama3, out, keep_last_n_checkpoints=1)
    save_steps(checkpointer, model, [3, 4])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["step_2", "step_4"]  # step_3 pruned
    assert _tree(out / "step_2") == before


def test_pruning_never_follows_a_symlink_named_like_a_checkpoint(tiny_llama3: Path, saved_llama3: Path, tmp_path: Path) -> None:
    outside, out = tmp_path / "outside", tmp_path / "out"
    shutil.copytree(saved_llama3, outside)  # an old checkpoint, with a manifest: it would be first to go
    out.mkdir()
    (out / "step_1").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    checkpointer, model = _loaded(tiny_llama3, out, keep_last_n_checkpoints=1)
    save_steps(checkpointer, model, [3, 4])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["step_1", "step_4"]
    assert (out / "step_1").is_symlink() and _tree(outside) == before


def test_a_long_job_holds_no_file_of_a_pruned_checkpoint_open(tiny_llama3: Path, tmp_path: Path) -> None:
    """A pruned checkpoint's disk space is free while the job runs: no descriptor of the process keeps one of its files."""
    out = tmp_path / "out"
    checkpointer, model = _loaded(tiny_llama3, out, keep_last_n_checkpoints=1)
    optimizer = torch.optim.AdamW(model.parameters())
    _train_and_save(checkpointer, model, optimizer, steps=(1, 2))
    resumed, model = _loaded(tiny_llama3, out, keep_last_n_checkpoints=1, resume_from_checkpoint=True)  # reads step_2
    optimizer = torch.optim.AdamW(model.parameters())
    resumed.load_training_state({"optimizer": optimizer.state_dict(), "progress": {"step": -1}})
    _train_and_save(resumed, model, optimizer, steps=(3, 4))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["step_4"]
    assert (out / "step_4" / TRAINING_STATE_DIR).is_dir()  # the pruned ones had their training state too
    assert [path for path in _open_files() if path.startswith(str(out)) and path.endswith("(deleted)")] == []


def _train_and_save(checkpointer: DistributedHFCheckpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: tuple[int, ...]) -> None:
    for step in steps:
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": {"step": step}}
        checkpointer.save_checkpoint(state, epoch=0, intermediate_checkpoint=True, step=step)


def _open_files() -> list[str]:
    """Where each open descriptor of this process points."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, closed since
            continue
    return paths


def test_pruning_never_deletes_the_checkpoint_it_just_saved(tiny_llama3: Path, saved_llama3: Path, tmp_path: Path) -> None:
    """A checkpoint stamped in the future (a node with a fast clock) must not make a save delete itself."""
    out = tmp_path / "out"
    shutil.copytree(saved_llama3, out / "step_9")
    manifest = json.loads((out / "step_9" / MANIFEST_FILE).read_text())
    manifest["created_ns"] = time.time_ns() + 10**9 * 3600 * 24 * 365
    (out / "step_9" / MANIFEST_FILE).write_text(json.dumps(manifest))
    checkpointer, model = _loaded(tiny_llama3, out, keep_last_n_checkpoints=1)
    save_steps(checkpointer, model, [3])
    assert (out / "step_3" / MANIFEST_FILE).is_file(), "the save deleted the checkpoint it had just published"


# ---- loads read only what the index names ------------------------------------------------------------


class FifoWatch:
    """Named pipes that report any process opening them for reading (a read would block on a pipe).

    A thread keeps trying to open each pipe for writing without blocking, which succeeds only
    while a reader has it open; the reader then gets end-of-file instead of hanging.
    """

    def __init__(self, paths: list[Path]):
        self.paths, self.opened, self.errors = paths, [], []
        self._stop = threading.Event()
        for path in paths:
            os.mkfifo(path)
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for path in self.paths:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as e:
                    if e.errno != errno.ENXIO:  # ENXIO: no reader, as it should be
                        self.errors.append(e)
                    continue
                self.opened.append(path.name)  # before the close: the reader's read returns only after it
                os.close(fd)
            time.sleep(0.005)

    def __enter__(self) -> FifoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        assert self.errors == [], "the watch itself failed"


def test_loads_read_only_the_files_the_index_names(tiny_llama3: Path, tmp_path: Path) -> None:
    folder = tmp_path / "base"
    shutil.copytree(tiny_llama3, folder)
    reference = DistributedHFCheckpointer(tiny_llama3, tmp_path / "o", MODEL_TYPE).load_checkpoint()["model"]
    strays = ["model.safetensors", "model-00099-of-00099.safetensors", "pytorch_model.bin", "consolidated.safetensors",
              "adapter_model.safetensors", "tokenizer.model", "notes.txt"]  # fmt: skip
    with FifoWatch([folder / name for name in strays]) as watch:
        reader = threading.Thread(target=lambda: (folder / "notes.txt").read_bytes(), daemon=True)
        reader.start()
        reader.join(timeout=10)
        assert watch.opened == ["notes.txt"]  # the watch sees a reader
        watch.opened.clear()

        checkpointer, model = _loaded(folder, tmp_path / "out")
        full = checkpointer.load_checkpoint()["model"]
        saved = Path(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0))  # copies tokenizer files
    assert watch.opened == []
    assert full.keys() == reference.keys() and all(torch.equal(full[k], reference[k]) for k in reference)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert not (saved / "tokenizer.model").exists() and (saved / "tokenizer.json").exists()
