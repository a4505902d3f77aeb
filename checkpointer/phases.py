"""The collective phases of a load or a save that are not DCP's own: hashing, in one place.

Each phase runs a step on every rank (an error on one rank is raised on all of them)
and exchanges only small results. Hashing splits the files among the ranks by size, so
each byte is read once.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.folder import Folder
from checkpointer.format.manifest import MANIFEST_FILE, sha256_of
from checkpointer.runtime.distributed import all_gather, on_all_ranks, rank, world_size
from checkpointer.runtime.failpoints import failpoint


def assign_by_size(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Split files among ``world`` ranks so each hashes about the same number of bytes."""
    shares: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += sizes[name]
    return shares


def hash_files(folder: Folder, sizes: dict[str, int], group: dist.ProcessGroup | None = None) -> dict[str, str]:
    """sha256 of every file in ``sizes``; each rank hashes its share (collective)."""
    mine = assign_by_size(sizes, world_size(group))[rank(group)]

    def hash_mine() -> dict[str, str]:
        failpoint("save:hash")
        return {name: sha256_of(folder, name) for name in mine}

    local = on_all_ranks(hash_mine, group)
    return {name: digest for part in all_gather(local, group) for name, digest in part.items()}


def verify_hashes(folder: Folder, manifest: dict[str, Any], names: list[str], group: dist.ProcessGroup | None = None) -> None:
    """Every file in ``names`` hashes to what the manifest recorded (collective, each byte read once)."""
    recorded = {n: (manifest["files"].get(n) or {}).get("sha256") for n in names}
    sizes = {n: folder.size(n) for n, digest in recorded.items() if digest}
    actual = hash_files(folder, sizes, group)
    bad = sorted(n for n in sizes if actual[n] != recorded[n])
    if bad:
        raise CheckpointFormatError(
            f"{folder.describe(bad[0])}: sha256 {actual[bad[0]][:16]}... differs from {recorded[bad[0]][:16]}... "
            f"in {MANIFEST_FILE}: the file is corrupt" + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else "")
        )

