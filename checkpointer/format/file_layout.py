"""Which file each Hugging Face tensor goes to, and at which byte offset.

The layout depends only on tensor names, dtypes and global shapes (known on every
rank) and on the base checkpoint's weight map or a maximum shard size, so every rank
computes the same headers and offsets without communicating.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from checkpointer.errors import CheckpointArgumentError
from checkpointer.format.hf_files import SINGLE_FILE
from checkpointer.format.safetensors import TensorEntry, TensorSpec, build_header

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (Hugging Face's convention: KB/MB/GB are powers of 10)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS:
        raise CheckpointArgumentError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'", key="max_shard_size")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def natural_key(name: str) -> list:
    """Sort ``layers.10`` after ``layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class FileLayout:
    """Headers, sizes and tensor positions of every output file."""

    headers: dict[str, bytes]  # file name -> header bytes, length prefix included
    sizes: dict[str, int]
    entries: dict[str, TensorEntry]

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: self.entries[name].file for name in sorted(self.entries, key=natural_key)}

    @property
    def needs_index(self) -> bool:
        return list(self.headers) != [SINGLE_FILE]

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def subset(self, file: str) -> FileLayout:
        """The layout of one file alone (to write the files one at a time)."""
        entries = {name: entry for name, entry in self.entries.items() if entry.file == file}
        return FileLayout({file: self.headers[file]}, {file: self.sizes[file]}, entries)


def _split_by_size(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


def assign_files(specs: dict[str, TensorSpec], weight_map: dict[str, str] | None, max_bytes: int) -> dict[str, list[TensorSpec]]:
    """File name -> its tensors: the base weight map when it names every one of these tensors, else by size.

    The map may name more (``rotary_emb.inv_freq`` caches, tied copies that are not saved): the
    files keep their split, and a file left with no tensors is not written.
    """
    if weight_map is not None and set(specs) <= set(weight_map):
        files: dict[str, list[TensorSpec]] = {}
        for name in sorted(specs, key=natural_key):
            files.setdefault(weight_map[name], []).append(specs[name])
        return files
    groups = _split_by_size([specs[n] for n in sorted(specs, key=natural_key)], max_bytes)
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups, start=1)}


def layout_files(
    specs: dict[str, TensorSpec], weight_map: dict[str, str] | None = None, max_shard_size: int | str = "5GB"
) -> FileLayout:
    """Lay out every tensor in its file."""
    headers, sizes, entries = {}, {}, {}
    for file, file_specs in assign_files(specs, weight_map, parse_size(max_shard_size)).items():
        header, file_entries = build_header(file, file_specs)
        headers[file] = header
        sizes[file] = len(header) + sum(s.nbytes for s in file_specs)
        entries.update(file_entries)
    return FileLayout(headers, sizes, entries)


def empty_file_layout(file: str) -> FileLayout:
    """One valid safetensors file with no tensors (an empty LoRA adapter is saved as such)."""
    header, _ = build_header(file, [])
    return FileLayout({file: header}, {file: len(header)}, {})
