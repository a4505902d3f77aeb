"""Integrity digests hashed while writing: what the manifest records, and verification on any rank count."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import fsspec
import pytest
import torch
import xxhash
from crash_workers import try_to_save
from dist_workers import case, load_expecting_errors

from checkpointer import DistributedHFCheckpointer
from checkpointer.cli import main as cli_main
from checkpointer.errors import CheckpointFormatError
from checkpointer.format.box_runs import Strided
from checkpointer.format.digests import Range, Unit, check_tiling
from checkpointer.format.folder import LocalFolder
from checkpointer.format.manifest import MANIFEST_FILE
from checkpointer.storage.fsspec_location import FsspecFolder
from checkpointer.testing.multiprocess import run_on_ranks

MODEL = "LLAMA3"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def _writable_copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    for path in [to, *to.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return to


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model*.safetensors"))


def test_every_file_is_tiled_by_ranges_whose_digests_are_its_bytes(saved_llama3):
    files = _manifest(saved_llama3)["files"]
    assert set(files) == {p.relative_to(saved_llama3).as_posix() for p in saved_llama3.rglob("*") if p.name != MANIFEST_FILE}
    for name, record in files.items():
        data = (saved_llama3 / name).read_bytes()
        ranges = record["xxh3_128"]
        assert [o for o, _, _ in ranges] == [0] + [o + n for o, n, _ in ranges[:-1]] and sum(n for _, n, _ in ranges) == len(data)
        assert all(xxhash.xxh3_128(data[o : o + n]).hexdigest() == d for o, n, d in ranges), name
    for path in _weight_files(saved_llama3):  # the header is hashed apart from the tensors the ranks wrote
        header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert files[path.name]["xxh3_128"][0][:2] == [0, header] and len(files[path.name]["xxh3_128"]) > 1


def test_a_checkpoint_saved_on_2_ranks_verifies_on_1_and_3_and_a_flipped_byte_is_found_on_every_rank(tiny_llama3, saved_llama3, tmp_path):
    saved_2 = Path(run_on_ranks(try_to_save, 2, str(tiny_llama3), str(tmp_path / "w2"), MODEL, timeout=180)[0])
    ranges_1, ranges_2 = (_manifest(p)["files"][_weight_files(p)[0].name]["xxh3_128"] for p in (saved_llama3, saved_2))
    assert len(ranges_2) > len(ranges_1)  # each rank hashed its own boxes: the ranges follow the saving world
    DistributedHFCheckpointer(saved_2, tmp_path / "unused", MODEL, verify_checksums=True).load_checkpoint()  # W = 1

    corrupt = _writable_copy(saved_2, tmp_path / "corrupt")
    victim = _weight_files(corrupt)[-1]
    _flip_last_byte(victim)
    cases = [case(n, MODEL, folder, tmp_path / "unused", verify_checksums=True) for n, folder in [("w1", saved_llama3), ("w2", saved_2), ("bad", corrupt)]]
    messages = run_on_ranks(load_expecting_errors, 3, cases, timeout=180)
    assert all(m["w1"] == "no error" and m["w2"] == "no error" for m in messages), messages
    size = victim.stat().st_size
    for m in messages:
        assert f"{victim}: xxh3_128 " in m["bad"] and f"..{size} differs from" in m["bad"] and "the file is corrupt" in m["bad"], m["bad"]


def _legacy(folder: Path) -> None:
    """Rewrite the manifest as checkpoints before range digests were: one sha256 per file."""
    manifest = _manifest(folder)
    for name, record in manifest["files"].items():
        manifest["files"][name] = {"size": record["size"], "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_older_manifests_with_one_sha256_per_file_still_verify(saved_llama3, tmp_path, capsys):
    legacy = _writable_copy(saved_llama3, tmp_path / "legacy")
    _legacy(legacy)
    DistributedHFCheckpointer(legacy, tmp_path / "unused", MODEL, verify_checksums=True).load_checkpoint()
    assert cli_main(["verify", str(legacy), "--full"]) == 0
    _flip_last_byte(_weight_files(legacy)[0])
    with pytest.raises(CheckpointFormatError, match=r"model-00001-of-00012.safetensors: sha256 .* differs .* the file is corrupt"):
        DistributedHFCheckpointer(legacy, tmp_path / "unused", MODEL, verify_checksums=True).load_checkpoint()
    capsys.readouterr()
    assert cli_main(["verify", str(legacy), "--full"]) == 1
    assert "model-00001-of-00012.safetensors: sha256" in capsys.readouterr().out


def test_digests_that_leave_bytes_unchecked_are_refused(saved_llama3, tmp_path):
    holes = _writable_copy(saved_llama3, tmp_path / "holes")
    manifest, name = _manifest(holes), _weight_files(holes)[0].name
    manifest["files"][name]["xxh3_128"].pop(1)  # a careless (or careful) editor drops the range of one tensor
    (holes / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointFormatError, match=rf"{name}: the digests cover \d+ bytes of \d+"):
        DistributedHFCheckpointer(holes, tmp_path / "unused", MODEL, verify_checksums=True).load_checkpoint()


def test_a_hub_publish_hashes_each_lfs_file_once_and_regular_files_never(saved_llama3, tmp_path, monkeypatch):
    """The Hub's LFS protocol needs each file's sha256: huggingface_hub computes it, once; the save computed none."""
    import huggingface_hub.lfs
    from huggingface_hub import HfApi

    from checkpointer.storage.hub_location import HubLocation
    from checkpointer.storage.urls import parse_location
    from checkpointer.testing.hub_server import LocalHub
    from checkpointer.testing.pytest_plugin import use_local_hub

    hashed, sha_fileobj = [], huggingface_hub.lfs.sha_fileobj
    monkeypatch.setattr(huggingface_hub.lfs, "sha_fileobj", lambda f, *a, **k: hashed.append(Path(f.name).name) or sha_fileobj(f, *a, **k))
    threshold = 8192
    with LocalHub(lfs_threshold=threshold) as hub:
        use_local_hub(monkeypatch, hub, tmp_path / "hf_home")
        HfApi().create_repo("tester/once")
        HubLocation(parse_location("hf://tester/once")).replace_with(saved_llama3)
        stored = {e.path: e for e in HfApi().list_repo_tree("tester/once", recursive=True) if hasattr(e, "lfs")}
    lfs = sorted(p.name for p in saved_llama3.iterdir() if p.stat().st_size >= threshold)
    assert lfs and len(lfs) < len(stored) - 1  # both kinds of upload happened
    assert sorted(hashed) == lfs  # each LFS file hashed exactly once; regular files never
    assert all(stored[name].lfs.sha256 == hashlib.sha256((saved_llama3 / name).read_bytes()).hexdigest() for name in lfs)


def _column_boxes(rows: int, widths: list[int]) -> list[Range]:
    """The strided ranges of a [rows, sum(widths)] tensor of bytes at offset 8, split into column boxes of ``widths``."""
    row, starts = sum(widths), [8 + sum(widths[:i]) for i in range(len(widths))]
    return [Range(start, width, row, rows, f"box{i}") for i, (start, width) in enumerate(zip(starts, widths))]


def test_column_boxes_of_the_same_rows_tile_their_tensor_and_a_missing_or_overlapping_one_is_refused():
    header = Range.of(Strided.one(0, 8), "header")
    boxes = _column_boxes(rows=5, widths=[3, 1, 4])
    size = 8 + 5 * 8
    assert check_tiling("f", [*reversed(boxes), header], size) == [header, *boxes]
    rows_below = [r._replace(offset=r.offset + 5 * 8) for r in _column_boxes(rows=5, widths=[2, 6])]  # a second row block
    assert len(check_tiling("f", [header, *boxes, *rows_below], size + 5 * 8)) == 6
    with pytest.raises(CheckpointFormatError, match=r"f: strided digests from byte 8 cover 4 bytes of rows of 8"):
        check_tiling("f", [header, boxes[0], boxes[1]], size)
    wide = boxes[1]._replace(length=2)  # overlaps the next box by one byte of every row
    with pytest.raises(CheckpointFormatError, match=r"f: the digests of 5 runs of 4 bytes, 8 apart, from byte 12 and of the runs beside it"):
        check_tiling("f", [header, boxes[0], wide, boxes[2]], size)
    with pytest.raises(CheckpointFormatError, match=r"f: a digest of 5 runs of 9 bytes, 8 apart, .* is not a strided range"):
        check_tiling("f", [header, Range(8, 9, 8, 5, "x")], size)


def test_a_range_keeps_the_short_form_for_one_run_and_reads_back_from_either_form():
    plain, strided = Range.of(Strided.one(8, 100), "a" * 32), Range(8, 10, 40, 7, "b" * 32)
    assert plain.as_json() == [8, 100, "a" * 32] and strided.as_json() == [8, 10, 40, 7, "b" * 32]
    assert [Range.from_json(json.loads(json.dumps(r.as_json()))) for r in (plain, strided)] == [plain, strided]
    for bad in ([8, 100], [8, 10, 40, "b"], [8.5, 100, "a"], [True, 1, "a"], {"offset": 8}):
        with pytest.raises(ValueError):
            Range.from_json(bad)


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_a_unit_hashes_its_runs_back_to_back_through_one_buffer_wherever_the_file_is(tmp_path, where):
    """Rows of a column box (more than one buffer holds) and a range longer than the buffer, locally and remotely."""
    data = torch.randint(0, 256, (3000 * 4096 + 8,), dtype=torch.uint8).numpy().tobytes()  # 3000 rows of 4 KiB after 8 bytes
    (tmp_path / "f").write_bytes(data)
    memory = fsspec.filesystem("memory")
    memory.pipe_file(f"/{tmp_path.name}/f", data)
    folder = LocalFolder(tmp_path) if where == "local" else FsspecFolder(memory, f"/{tmp_path.name}", f"memory://{tmp_path.name}")
    column = Strided(8 + 1000, 2048, 4096, 3000)  # 6 MB of rows: several reads of the 4 MB buffer
    plain = Strided.one(8, 3000 * 4096)  # 12 MB in one range
    for runs in (column, plain):
        expected = xxhash.xxh3_128(b"".join(data[s : s + runs.length] for s in runs.starts())).hexdigest()
        assert Unit("f", runs).hash(folder) == expected
