"""The safetensors file format, read and written by hand at known byte offsets.

A file is ``u64 little-endian header length N``, ``N`` bytes of JSON, then the tensor
data. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` of strings.
Parsing is as strict as the reference implementation: offsets must tile the data
section exactly, byte lengths must match shape x dtype, and the file must not be
truncated. Every error names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Iterable

import torch

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES
from checkpointer.format.json_files import parse_json

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"
REFETCH = "copy or download it again"



@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in the file."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (the whole tensor for a scalar)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    def contiguous_box(self, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> int | None:
        """The file offset of the box at ``offsets`` of ``lengths`` when its bytes are one run, else None.

        A box is one run when it is a single index along each dim before some dim ``k`` and
        whole along every dim after ``k`` (whole rows; or one expert's rows of a 3-D tensor).
        """
        if not self.shape:
            return self.start
        k = next((d for d, n in enumerate(lengths) if n != 1), len(lengths) - 1)
        if any(o or n != size for o, n, size in zip(offsets[k + 1 :], lengths[k + 1 :], self.shape[k + 1 :])):
            return None
        element, stride = 0, 1
        for offset, size in zip(reversed(offsets), reversed(self.shape)):
            element += offset * stride
            stride *= size
        return self.start + element * self.dtype.itemsize


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensors by name, metadata, and the file's expected size."""

    file: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def header_length(prefix: bytes, file: str, file_size: int) -> int:
    """Decode and check the 8-byte length prefix of ``file``."""
    if file_size == 0:
        raise CheckpointFormatError(f"{file}: the file is empty (0 bytes): it was never written completely; {REFETCH}", file=file)
    if len(prefix) < 8 or file_size < 8:
        raise CheckpointFormatError(f"{file}: truncated: {file_size} bytes is too short for a safetensors file; {REFETCH}", file=file)
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{file}: header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or hostile file)",
            file=file,
        )
    if 8 + length > file_size:
        raise CheckpointFormatError(
            f"{file}: header length {length} runs past the end of the file ({file_size} bytes): truncated or corrupt; {REFETCH}",
            file=file,
        )
    return length


def parse_header(header_json: bytes, file: str, file_size: int, where: str | None = None) -> Header:
    """Parse and validate a header given its JSON bytes and the file's total size.

    ``file`` is recorded in each entry; ``where`` (default ``file``) names it in errors.
    """
    data_start = 8 + len(header_json)
    where = where or file
    raw = parse_json(header_json, where, "header", f"not a safetensors file, or corrupt; {REFETCH}")
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{where}: header is not a JSON object", file=where)
    metadata = _parse_metadata(raw.pop(METADATA_KEY, None), where)
    tensors = {name: _parse_entry(name, info, file, data_start, where) for name, info in raw.items()}
    _check_tiling(tensors.values(), where, data_start, file_size)
    return Header(file, tensors, metadata, data_start, file_size)


def _parse_metadata(raw: object, file: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{file}: {METADATA_KEY} is {_a(raw)}, not an object of strings", file=file)
    for key, value in raw.items():
        if not isinstance(value, str):
            raise CheckpointFormatError(
                f"{file}: {METADATA_KEY}[{key!r}] is {_a(value)}, not a string (safetensors metadata maps strings to strings)",
                file=file, key=key,
            )
    return dict(raw)


def _a(value: object) -> str:
    """``an int``, ``a list``: the JSON value's Python type for messages."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _parse_entry(name: str, info: object, file: str, data_start: int, location: str) -> TensorEntry:
    where = f"{location}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointFormatError(f"{where}: entry is not a JSON object", file=location, key=name)
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(f"{where}: unknown dtype {dtype_name!r} (safetensors dtypes: {', '.join(SAFETENSORS_DTYPES)})", file=location, key=name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers", file=location, key=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointFormatError(f"{where}: data_offsets {offsets!r} are not [begin, end] with begin <= end", file=location, key=name)
    dtype = SAFETENSORS_DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise CheckpointFormatError(
            f"{where}: holds {offsets[1] - offsets[0]} bytes but shape {shape} x {dtype_name} needs {expected}: corrupt header; {REFETCH}",
            file=location, key=name,
        )
    return TensorEntry(name, file, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_tiling(entries: Iterable[TensorEntry], file: str, data_start: int, file_size: int) -> None:
    """Tensors must cover the data section exactly once, in order, with nothing after it."""
    position = data_start
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.end > file_size:
            raise CheckpointFormatError(
                f"{file}: tensor {entry.name!r} (data_offsets [{entry.start - data_start}, {entry.end - data_start}]) "
                f"runs past the end of the file ({file_size} bytes): truncated or corrupt; {REFETCH}",
                file=file, key=entry.name,
            )
        if entry.start != position:
            problem = "overlaps the previous tensor" if entry.start < position else "leaves a gap before it"
            raise CheckpointFormatError(
                f"{file}: tensor {entry.name!r} at data offset {entry.start - data_start} {problem}: corrupt header; {REFETCH}",
                file=file, key=entry.name,
            )
        position = entry.end
    if position < file_size:
        raise CheckpointFormatError(
            f"{file}: {file_size - position} unexpected bytes after the last tensor: corrupt; {REFETCH}",
            file=file,
        )


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, dtype and global shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def build_header(
    file: str, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, TensorEntry]]:
    """Lay out ``specs`` in one file: the header bytes (prefix included) and each tensor's entry.

    Tensors are ordered by decreasing alignment, then name, so every tensor starts at a
    multiple of its element size; the header is padded with spaces to 8 bytes.
    """
    ordered = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))
    header: dict[str, object] = {METADATA_KEY: dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in ordered:
        if spec.dtype not in SAFETENSORS_NAMES:
            raise CheckpointFormatError(f"{file}: tensor {spec.name!r}: dtype {spec.dtype} cannot be stored", file=file, key=spec.name)
        header[spec.name] = {
            "dtype": SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    data_start = 8 + len(text)
    entries = {
        spec.name: TensorEntry(spec.name, file, spec.dtype, spec.shape, data_start + start, data_start + end)
        for spec in ordered
        for start, end in [header[spec.name]["data_offsets"]]  # type: ignore[index]
    }
    return struct.pack("<Q", len(text)) + text, entries
