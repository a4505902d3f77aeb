"""Digests of byte ranges of checkpoint files, computed from memory while the bytes are written.

A saved file's integrity record is a list of ranges ``[offset, length, xxh3_128 hex]`` that
tile the file exactly (no gap, no overlap): the header, then one range per box a rank wrote
(hashed by that rank from the memory it wrote from, never read back). The ranges follow the
saving ranks' boxes, so they depend on how the checkpoint was saved, but they carry their
own offsets: any number of processes can check them, each reading the ranges it is given.
Files written by other code (config, index, tokenizer, training state) are read back once
and hashed in fixed-size chunks, which several ranks can share.

Checkpoints written before these digests recorded one sha256 per file; :func:`check_units`
still checks those.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import xxhash

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.folder import Folder

ALGORITHM = "xxh3_128"  # the manifest key of a file's range digests
LEGACY_ALGORITHM = "sha256"  # one digest of the whole file, in older manifests
READ_BACK_CHUNK = 64 * 2**20  # a range of a file that is hashed by reading it back
_READ_BUFFER = 4 * 2**20

Range = tuple[int, int, str]  # offset, length, hex digest of those bytes
Digests = dict[str, list[Range]]  # file (relative path) -> ranges tiling it


def digest_of(pieces: Iterable[memoryview | bytes]) -> str:
    """The xxh3_128 hex digest of ``pieces`` back to back (no copy)."""
    digest = xxhash.xxh3_128()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def hash_chunks(read_into: Callable[[int, memoryview], Any], size: int, digest: Any) -> str:
    """Feed ``digest`` ``size`` bytes, read in chunks into one reused buffer (no copies, no growth); its hex digest."""
    buffer, offset = memoryview(bytearray(min(_READ_BUFFER, size))), 0
    while offset < size:
        chunk = buffer[: min(len(buffer), size - offset)]
        read_into(offset, chunk)
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Unit:
    """Bytes ``offset .. offset + length`` of file ``name``, and what they must hash to with ``algorithm``."""

    name: str
    offset: int
    length: int
    algorithm: str = ALGORITHM
    expected: str | None = None

    def hash(self, folder: Folder) -> str:
        digest = xxhash.xxh3_128() if self.algorithm == ALGORITHM else hashlib.sha256()
        return hash_chunks(lambda at, chunk: folder.read_into(self.name, self.offset + at, [chunk]), self.length, digest)


def read_back_units(sizes: dict[str, int], chunk: int = READ_BACK_CHUNK) -> list[Unit]:
    """Each file of ``sizes`` cut into ranges of at most ``chunk`` bytes (an empty file is one empty range)."""
    return [Unit(name, start, min(chunk, size - start)) for name, size in sizes.items() for start in range(0, max(size, 1), chunk)]


def read_back_digests(folder: Folder, sizes: dict[str, int]) -> Digests:
    """Range digests of the files of ``sizes``, read back by this process alone (for small files)."""
    units = read_back_units(sizes)
    return ranges_of(units, [unit.hash(folder) for unit in units])


def ranges_of(units: Sequence[Unit], digests: Sequence[str]) -> Digests:
    """Units and their computed digests, as the manifest records them."""
    found: Digests = {}
    for unit, digest in zip(units, digests):
        found.setdefault(unit.name, []).append((unit.offset, unit.length, digest))
    return found


def check_tiling(where: str, ranges: Sequence[Range], size: int) -> list[Range]:
    """``ranges`` sorted by offset, or an error naming ``where`` if they do not cover ``0 .. size`` exactly once."""
    ordered = sorted((int(o), int(n), str(d)) for o, n, d in ranges)
    end = 0
    for offset, length, _ in ordered:
        if offset != end or length < 0:
            raise CheckpointFormatError(f"{where}: the digests cover bytes up to {end}, then start at {offset}: they do not tile the file", file=where)
        end = offset + length
    if end != size and not (size == 0 and not ordered):
        raise CheckpointFormatError(f"{where}: the digests cover {end} bytes of {size}", file=where)
    return ordered


def units_to_verify(folder: Folder, name: str, record: dict[str, Any], size: int) -> list[Unit]:
    """What to hash to check file ``name`` against its manifest ``record``: its ranges, else its sha256, else nothing."""
    ranges = record.get(ALGORITHM)
    if isinstance(ranges, list):
        try:
            listed = [(int(o), int(n), str(d)) for o, n, d in ranges]
        except (TypeError, ValueError):
            raise CheckpointFormatError(
                f"{folder.describe(name)}: its {ALGORITHM} digests are not [offset, length, digest] lists", file=folder.describe(name)
            ) from None
        tiles = check_tiling(folder.describe(name), listed, size)
        return [Unit(name, offset, length, ALGORITHM, digest) for offset, length, digest in tiles]
    if record.get(LEGACY_ALGORITHM):
        return [Unit(name, 0, size, LEGACY_ALGORITHM, str(record[LEGACY_ALGORITHM]).lower())]
    return []


def mismatch(folder: Folder, unit: Unit, actual: str) -> str:
    """The message for a unit whose bytes do not hash to what the manifest recorded."""
    return (
        f"{folder.describe(unit.name)}: {unit.algorithm} {actual[:16]}... of bytes {unit.offset}..{unit.offset + unit.length} "
        f"differs from {unit.expected[:16]}... in checkpointer.json: the file is corrupt or was replaced"
    )
