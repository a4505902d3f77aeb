"""The collective phases of a load or a save that are not DCP's own: hashing, in one place.

Each phase runs a step on every rank (an error on one rank is raised on all of them)
and exchanges only small results. Hashing splits the work among the ranks by size, in
ranges of files (:class:`~checkpointer.format.digests.Unit`), so each byte is read once
and one big file is shared by several ranks.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch.distributed as dist

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.digests import Digests, Unit, mismatch, ranges_of, read_back_units, units_to_verify
from checkpointer.format.folder import Folder
from checkpointer.runtime.distributed import all_gather, on_all_ranks, rank, world_size
from checkpointer.runtime.failpoints import failpoint


def assign_by_size(sizes: dict[Hashable, int], world: int) -> list[list[Hashable]]:
    """Split work among ``world`` ranks so each hashes about the same number of bytes."""
    shares: list[list[Hashable]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += sizes[name]
    return shares


def hash_units(
    folder: Folder, units: Sequence[Unit], group: dist.ProcessGroup | None = None, readers: Sequence[int] | None = None
) -> list[str]:
    """The digest of every unit (in order); each rank of ``readers`` (default: all) hashes its share (collective)."""
    readers = list(range(world_size(group))) if readers is None else list(readers)
    shares = dict(zip(readers, assign_by_size({i: unit.length for i, unit in enumerate(units)}, len(readers))))
    mine = shares.get(rank(group), [])

    def hash_mine() -> dict[int, str]:
        failpoint("save:hash")
        return {i: units[i].hash(folder) for i in mine}

    local = on_all_ranks(hash_mine, group)
    found = {i: digest for part in all_gather(local, group) for i, digest in part.items()}
    return [found[i] for i in range(len(units))]


def hash_files(
    folder: Folder, sizes: dict[str, int], group: dist.ProcessGroup | None = None, readers: Sequence[int] | None = None
) -> Digests:
    """Range digests of every file in ``sizes``, read back in chunks shared among ``readers`` (default: all ranks; collective)."""
    units = read_back_units(sizes)
    return ranges_of(units, hash_units(folder, units, group, readers))


def verify_hashes(folder: Folder, manifest: dict[str, Any], names: list[str], group: dist.ProcessGroup | None = None) -> None:
    """Every file in ``names`` hashes to what the manifest recorded (collective, each byte read once).

    Ranges (saved on any number of ranks) are shared among this group's ranks as they come;
    an older manifest's sha256 covers a whole file, hashed by one rank.
    """
    records = {n: manifest["files"].get(n) for n in names}
    units = [u for n, r in records.items() if isinstance(r, dict) for u in units_to_verify(folder, n, r, folder.size(n))]
    actual = hash_units(folder, units, group)
    bad = [(unit, digest) for unit, digest in zip(units, actual) if digest != unit.expected]
    if bad:
        more = len({unit.name for unit, _ in bad} - {bad[0][0].name})
        raise CheckpointFormatError(mismatch(folder, *bad[0]) + (f" (and {more} more files)" if more else ""), file=folder.describe(bad[0][0].name))
