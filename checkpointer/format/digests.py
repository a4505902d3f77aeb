"""Digests of byte ranges of checkpoint files, computed from memory while the bytes are written.

A saved file's integrity record is a list of ranges that tile the file exactly (no gap, no
overlap): the header, then one range per box a rank wrote (hashed by that rank from the
memory it wrote from, never read back). A range is ``[offset, length, digest]``, or, for a
box that splits rows (a tensor-parallel column block), ``[offset, length, stride, count,
digest]``: ``count`` runs of ``length`` bytes, ``stride`` apart, hashed back to back, so a
column box is one digest however many rows it has. The ranges follow the saving ranks'
boxes, so they depend on how the checkpoint was saved, but they carry their own offsets: any
number of processes can check them, each reading the ranges it is given.
Files written by other code (config, index, tokenizer, training state) are read back once
and hashed in fixed-size chunks, which several ranks can share.

Checkpoints written before these digests recorded one sha256 per file; :func:`units_to_verify`
still checks those.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import xxhash

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.box_runs import Strided
from checkpointer.format.folder import Folder

ALGORITHM = "xxh3_128"  # the manifest key of a file's range digests
LEGACY_ALGORITHM = "sha256"  # one digest of the whole file, in older manifests
READ_BACK_CHUNK = 64 * 2**20  # a range of a file that is hashed by reading it back
MAX_RUNS = 2**24  # runs in one strided range (a column box of the largest vocabulary has about 2**18)
_READ_BUFFER = 4 * 2**20


class Range(NamedTuple):
    """The digest of ``count`` runs of ``length`` bytes from ``offset``, ``stride`` apart, back to back."""

    offset: int
    length: int
    stride: int
    count: int
    digest: str

    @classmethod
    def of(cls, runs: Strided, digest: str) -> Range:
        return cls(*runs, digest)

    @property
    def runs(self) -> Strided:
        return Strided(self.offset, self.length, self.stride, self.count)

    def as_json(self) -> list[Any]:
        """The manifest's form: ``[offset, length, digest]`` for one run, else ``[offset, length, stride, count, digest]``."""
        return [self.offset, self.length, self.digest] if self.count == 1 else list(self)

    @classmethod
    def from_json(cls, value: Any) -> Range:
        """A range from the manifest's form (ValueError if it is neither form)."""
        if not isinstance(value, list) or len(value) not in (3, 5) or any(isinstance(v, (bool, float)) for v in value[:-1]):
            raise ValueError(value)
        numbers = [int(n) for n in value[:-1]]
        return cls.of(Strided(*numbers) if len(numbers) == 4 else Strided.one(*numbers), str(value[-1]))


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
    """The bytes of ``runs`` in file ``name``, back to back, and what they must hash to with ``algorithm``."""

    name: str
    runs: Strided
    algorithm: str = ALGORITHM
    expected: str | None = None

    def hash(self, folder: Folder) -> str:
        """The digest of the unit's bytes, read through one buffer (a column box's rows many at a time)."""
        digest = xxhash.xxh3_128() if self.algorithm == ALGORITHM else hashlib.sha256()
        buffer = memoryview(bytearray(max(1, min(_READ_BUFFER, self.runs.nbytes))))
        for batch in _batches(self.runs, len(buffer)):
            filled = buffer[: sum(length for _, length in batch)]
            folder.read_runs(self.name, batch, [filled])
            digest.update(filled)
        return digest.hexdigest()


def _batches(runs: Strided, limit: int) -> Iterator[list[tuple[int, int]]]:
    """``runs`` cut into pieces of at most ``limit`` bytes, in reads of at most ``limit`` bytes together."""
    batch, size = [], 0
    for start in runs.starts():
        for at in range(0, runs.length, limit):
            length = min(limit, runs.length - at)
            if size + length > limit:
                yield batch
                batch, size = [], 0
            batch.append((start + at, length))
            size += length
    if batch:
        yield batch


def read_back_units(sizes: dict[str, int], chunk: int = READ_BACK_CHUNK) -> list[Unit]:
    """Each file of ``sizes`` cut into ranges of at most ``chunk`` bytes (an empty file is one empty range)."""
    return [
        Unit(name, Strided.one(start, min(chunk, size - start))) for name, size in sizes.items() for start in range(0, max(size, 1), chunk)
    ]


def read_back_digests(folder: Folder, sizes: dict[str, int]) -> Digests:
    """Range digests of the files of ``sizes``, read back by this process alone (for small files)."""
    units = read_back_units(sizes)
    return ranges_of(units, [unit.hash(folder) for unit in units])


def ranges_of(units: Sequence[Unit], digests: Sequence[str]) -> Digests:
    """Units and their computed digests, as the manifest records them."""
    found: Digests = {}
    for unit, digest in zip(units, digests):
        found.setdefault(unit.name, []).append(Range.of(unit.runs, digest))
    return found


def check_tiling(where: str, ranges: Sequence[Range], size: int) -> list[Range]:
    """``ranges`` sorted by offset, or an error naming ``where`` if they do not cover ``0 .. size`` exactly once."""
    ordered = sorted(ranges)
    end = 0
    for offset, length in sorted(_covered(where, ordered)):
        if offset != end or length < 0:
            raise _untiled(where, f"the digests cover bytes up to {end}, then start at {offset}: they do not tile the file")
        end = offset + length
    if end != size and not (size == 0 and not ordered):
        raise _untiled(where, f"the digests cover {end} bytes of {size}")
    return ordered


def _covered(where: str, ordered: Sequence[Range]) -> list[tuple[int, int]]:
    """The contiguous spans the ranges cover: each plain range, and each band of strided ranges.

    Strided ranges of one stride and count form a band when their first runs tile one stride
    (the column boxes of the same rows): together they cover ``stride * count`` bytes.
    """
    spans = [(r.offset, r.length) for r in ordered if r.count == 1]
    bands: dict[tuple[int, int], list[Range]] = {}
    for r in ordered:
        if r.count != 1:
            if not (0 < r.length <= r.stride and 1 < r.count <= MAX_RUNS):
                raise _untiled(where, f"a digest of {r.runs.describe()} is not a strided range of at most {MAX_RUNS} runs")
            bands.setdefault((r.stride, r.count), []).append(r)
    for (stride, count), members in bands.items():
        start = end = -1
        for r in members:  # in offset order
            if end == -1:
                start = end = r.offset
            if r.offset != end or end + r.length > start + stride:
                raise _untiled(where, f"the digests of {r.runs.describe()} and of the runs beside it do not tile their rows")
            end += r.length
            if end == start + stride:
                spans.append((start, stride * count))
                end = -1
        if end != -1:
            raise _untiled(where, f"strided digests from byte {start} cover {end - start} bytes of rows of {stride}")
    return spans


def _untiled(where: str, what: str) -> CheckpointFormatError:
    """The error for digests of file ``where`` that do not tile it."""
    return CheckpointFormatError(f"{where}: {what}", file=where)


def units_to_verify(folder: Folder, name: str, record: dict[str, Any], size: int) -> list[Unit]:
    """What to hash to check file ``name`` against its manifest ``record``: its ranges, else its sha256, else nothing."""
    ranges = record.get(ALGORITHM)
    if isinstance(ranges, list):
        try:
            listed = [Range.from_json(r) for r in ranges]
        except (TypeError, ValueError):
            raise CheckpointFormatError(
                f"{folder.describe(name)}: its {ALGORITHM} digests are not [offset, length, digest] or "
                "[offset, length, stride, count, digest] lists", file=folder.describe(name),
            ) from None  # fmt: skip
        return [Unit(name, r.runs, ALGORITHM, r.digest) for r in check_tiling(folder.describe(name), listed, size)]
    if record.get(LEGACY_ALGORITHM):
        return [Unit(name, Strided.one(0, size), LEGACY_ALGORITHM, str(record[LEGACY_ALGORITHM]).lower())]
    return []


def mismatch(folder: Folder, unit: Unit, actual: str) -> str:
    """The message for a unit whose bytes do not hash to what the manifest recorded."""
    return (
        f"{folder.describe(unit.name)}: {unit.algorithm} {actual[:16]}... of {unit.runs.describe()} "
        f"differs from {unit.expected[:16]}... in checkpointer.json: the file is corrupt or was replaced"
    )
