"""Our safetensors reader and header writer against the safetensors library itself."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors_files import write_raw

from checkpointer.errors import CheckpointArgumentError, CheckpointFormatError
from checkpointer.format.file_layout import layout_files, parse_size
from checkpointer.format.folder import LocalFolder
from checkpointer.format.hf_files import read_header
from checkpointer.format.safetensors import TensorSpec, build_header
from checkpointer.format.tensor_io import tensor_bytes


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g),
        "c.scalar": torch.tensor(2.5, dtype=torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_headers_of_files_written_by_safetensors_are_read_exactly(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(LocalFolder(tmp_path), "x.safetensors")
    assert header.metadata == {"format": "pt"}
    data = (tmp_path / "x.safetensors").read_bytes()
    for name, tensor in tensors.items():
        entry = header.tensors[name]
        assert (entry.dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape))
        raw = torch.frombuffer(bytearray(data[entry.start : entry.end]), dtype=torch.uint8)
        assert torch.equal(raw.view(tensor.dtype).reshape(tensor.shape), tensor)


def test_files_built_from_our_headers_load_in_safetensors(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    header, entries = build_header("y.safetensors", specs)
    assert len(header) % 8 == 0
    blob = bytearray(header) + bytearray(sum(s.nbytes for s in specs))
    for name, tensor in tensors.items():
        entry = entries[name]
        assert entry.start % tensor.element_size() == 0  # naturally aligned
        blob[entry.start : entry.end] = bytes(tensor_bytes(tensor.contiguous()))
    (tmp_path / "y.safetensors").write_bytes(bytes(blob))
    loaded = load_file(tmp_path / "y.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert json.loads(header[8:])["__metadata__"] == {"format": "pt"}


@pytest.mark.parametrize(
    "header,data,length,message",
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**6, "runs past the end"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2 * 10**8, "exceeds"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype 'Q4'"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8,
            None,
            "'u'",
        ),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "gap"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "unexpected bytes"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "shape"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "data_offsets"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ],
)
def test_bad_headers_are_refused_naming_the_file(tmp_path, header, data, length, message):
    write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        read_header(LocalFolder(tmp_path), "bad.safetensors")
    assert "bad.safetensors" in str(info.value)


def test_header_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        read_header(LocalFolder(tmp_path), "bad.safetensors")


def test_sizes_follow_hugging_face_units():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("20KB") == 20_000
    assert parse_size("1GiB") == 2**30
    assert parse_size(123) == 123
    with pytest.raises(CheckpointArgumentError, match="max_shard_size") as info:
        parse_size("five gigs")
    assert isinstance(info.value, ValueError) and info.value.key == "max_shard_size"


def test_file_layout_follows_the_base_weight_map_or_splits_by_size():
    specs = {f"layers.{i}.w": TensorSpec(f"layers.{i}.w", torch.float32, (10, 10)) for i in range(12)}
    by_size = layout_files(specs, None, max_shard_size=1000)
    assert len(by_size.headers) == 6 and by_size.needs_index
    assert [by_size.entries[f"layers.{i}.w"].file for i in (0, 1, 2, 11)] == [
        "model-00001-of-00006.safetensors", "model-00001-of-00006.safetensors",
        "model-00002-of-00006.safetensors", "model-00006-of-00006.safetensors",
    ]  # fmt: skip
    weight_map = {name: ("a.safetensors" if i % 2 else "b.safetensors") for i, name in enumerate(specs)}
    assert layout_files(specs, weight_map).weight_map == {n: weight_map[n] for n in by_size.weight_map}
    single = layout_files(specs, None)
    assert list(single.headers) == ["model.safetensors"] and not single.needs_index


def test_one_tensor_at_a_time_read_and_pwritten_into_a_planned_layout(tmp_path):
    import os

    from checkpointer.format.tensor_io import create_files, read_tensor, write_tensor

    tensors = _tensors()
    save_file(tensors, tmp_path / "x.safetensors")
    source = LocalFolder(tmp_path)
    header = read_header(source, "x.safetensors")
    read = {name: read_tensor(source, entry) for name, entry in header.tensors.items()}
    assert all(torch.equal(read[n], t) and read[n].dtype == t.dtype for n, t in tensors.items())

    specs = {n: TensorSpec(n, torch.float32 if t.is_floating_point() else t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    layout = layout_files(specs, {"a.weight": "1.safetensors", "b.bias": "1.safetensors", "c.scalar": "2.safetensors", "d.ids": "2.safetensors"})
    for file in layout.headers:
        one = layout.subset(file)
        create_files(tmp_path / "out", one)
        fd = os.open(tmp_path / "out" / file, os.O_WRONLY)
        for name, entry in one.entries.items():
            write_tensor(fd, entry, read[name])
        os.close(fd)
    loaded = {**load_file(tmp_path / "out" / "1.safetensors"), **load_file(tmp_path / "out" / "2.safetensors")}
    assert all(torch.equal(loaded[n], t.to(specs[n].dtype)) for n, t in tensors.items())


def test_scan_lists_every_problem_where_read_raises_the_first(tmp_path):
    from checkpointer.format.hf_files import INDEX_FILE, read_checkpoint_files, scan_checkpoint_files

    save_file({"a": torch.zeros(4), "b": torch.ones(2)}, tmp_path / "1.safetensors")
    save_file({"c": torch.zeros(3)}, tmp_path / "2.safetensors")
    (tmp_path / "2.safetensors").write_bytes((tmp_path / "2.safetensors").read_bytes()[:-4])  # truncated
    index = {"weight_map": {"a": "1.safetensors", "x": "1.safetensors", "c": "2.safetensors", "d": "3.safetensors"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    files, problems = scan_checkpoint_files(LocalFolder(tmp_path))
    assert files.files == ("1.safetensors",) and set(files.tensors) == {"a", "b"}
    assert len(problems) == 4, problems
    for expected in ("3.safetensors: missing", "2.safetensors: tensor", "'x' is assigned to 1.safetensors", "'b' in 1.safetensors is not in the index"):
        assert any(expected in p for p in problems), (expected, problems)
    assert "truncated" in next(p for p in problems if "2.safetensors" in p)
    with pytest.raises(CheckpointFormatError, match=r"and 3 more problem"):
        read_checkpoint_files(LocalFolder(tmp_path))
