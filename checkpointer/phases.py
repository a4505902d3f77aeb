"""Every collective step of a load or a save, by name, in one place.

Each function here is collective: every rank of ``group`` calls it, in the same order
(like ``torch.distributed.checkpoint.state_dict_loader``, whose phases are named
``"plan"`` and ``"read"``). A step that fails on one rank raises the same error on all
of them, and only small results travel between ranks. Nothing outside this module
starts a collective: the steps below call DCP's own ``load``/``save`` (:func:`read`,
:func:`write`) and the helpers that move files between nodes (``checkpointer.dcp``'s
``node_copy`` and ``node_staging``). Storage backends know bytes and files and take no
process group; the phases decide which rank runs them:

- ``decide``: rank 0 answers a question (what is published, which commit to read), every rank gets the answer;
- ``act`` / ``publish``: rank 0 changes the output folder (makes a save's staging folder, prunes old
  checkpoints; makes the checkpoint visible), every rank learns only whether it failed;
- ``check`` / ``plan``: every rank computes the same thing from the same inputs (the write plan, the checks);
- ``once_per_node``: local rank 0 does it (download, copy), the others wait;
- ``open_folder`` / ``fetch_folder``: find what to read (rank 0), download it (once per node), open it (every rank);
  a local folder missing on some node is sent there from rank 0's;
- ``node_staging``: where a save is assembled when the nodes share no file system;
- ``check_files``: headers and the manifest's sizes in one collective, then hashes split across ranks;
- ``read`` / ``write``: DCP's own load and save of this rank's shards;
- ``hash_units`` / ``hash_files`` / ``verify_hashes``: digests of file ranges, split across ranks by size, each
  byte read once (saves hash what they write from memory; only other files are read back);
- ``publish``: rank 0 makes the checkpoint visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch.distributed as dist

from checkpointer.dcp.hf_io import read_hf_tensors, write_hf_tensors
from checkpointer.dcp.node_copy import readable_here
from checkpointer.dcp.node_staging import NodeStaging
from checkpointer.dcp.training_state import load_training_state, save_training_state
from checkpointer.errors import CheckpointFormatError
from checkpointer.format.digests import Digests, Unit, mismatch, ranges_of, read_back_units, units_to_verify
from checkpointer.format.folder import Folder
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.format.manifest import check_against_manifest, read_manifest
from checkpointer.runtime.distributed import (
    by_rank_zero,
    gather_on_all_ranks,
    is_distributed,
    local_rank,
    on_all_ranks,
    on_rank_zero,
    rank,
    world_size,
)
from checkpointer.runtime.failpoints import failpoint
from checkpointer.storage.local import LocalLocation
from checkpointer.storage.location import Location

decide = on_rank_zero  # rank 0 runs the step; every rank returns its result or raises its error
act = by_rank_zero  # rank 0 runs the step; every rank raises its error (one all-reduce: nobody else needs its result)
plan = on_all_ranks  # every rank runs the step; an error anywhere is raised everywhere
check = on_all_ranks
publish = by_rank_zero
read = read_hf_tensors  # DCP's load: each rank reads the bytes of its own shards
write = write_hf_tensors  # DCP's save: each rank writes its own bytes into the final HF files
read_training_state = load_training_state
write_training_state = save_training_state
node_staging = NodeStaging.of  # which ranks share a save's staging folder; several nodes: rank 0's assembles it


def once_per_node(step: Callable[[], None], group: dist.ProcessGroup | None = None) -> None:
    """Run ``step`` on local rank 0 of each node while the node's other ranks wait; errors reach every rank."""
    on_all_ranks(lambda: step() if local_rank(group) == 0 else None, group)


def open_folder(
    location: Location, group: dist.ProcessGroup | None = None, *, streaming: bool = False, checkpoint_files: list[str] | None = None
) -> Folder:
    """The checkpoint at ``location`` as a folder on every rank: rank 0 finds what to read, each node downloads it once.

    A local folder is read where it is; a node that lacks it reads a copy of rank 0's, sent over the group.
    """
    if isinstance(location, LocalLocation):
        path = readable_here(location.path, group, lambda: location.files_to_copy(checkpoint_files))
        return check(lambda: LocalLocation(path).folder(None), group)
    return _find_download_open(location, group, checkpoint_files=checkpoint_files, streaming=streaming)


def fetch_folder(location: Location, group: dist.ProcessGroup | None = None) -> Path:
    """A local copy of every file below ``location`` (a local folder is read where it is), once per node."""
    if isinstance(location, LocalLocation):
        return readable_here(location.path, group)
    return _find_download_open(location, group, whole_folder=True).root


def _find_download_open(location: Location, group: dist.ProcessGroup | None, **what: Any) -> Folder:
    """Rank 0 finds what to read (``what``: ``find``'s arguments), each node downloads it once, every rank opens it."""
    found = decide(lambda: location.find(**what), group)
    once_per_node(lambda: location.download(found), group)
    return check(lambda: location.folder(found), group)


def check_files(
    folder: Folder, read_files: Callable[[], CheckpointFiles], group: dist.ProcessGroup | None = None, *, verify_checksums: bool = False
) -> CheckpointFiles:
    """``read_files()`` on every rank, checked against ``folder``'s manifest (sizes; hashes with ``verify_checksums``)."""

    def read() -> tuple[CheckpointFiles, dict[str, Any] | None]:
        files, manifest = read_files(), read_manifest(folder)
        if manifest is not None:
            check_against_manifest(folder, manifest, list(files.files))
        return files, manifest

    files, manifest = on_all_ranks(read, group)  # one collective for all the checks
    if manifest is not None and verify_checksums:
        verify_hashes(folder, manifest, list(files.files), group)
    return files


def new_group() -> dist.ProcessGroup | None:
    """A process group of the same ranks for background work (every rank calls it; None without one)."""
    return dist.new_group(backend="gloo") if is_distributed() else None


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
    shares = dict(zip(readers, assign_by_size({i: unit.runs.nbytes for i, unit in enumerate(units)}, len(readers))))
    mine = shares.get(rank(group), [])

    def hash_mine() -> dict[int, str]:
        failpoint("save:hash")
        return {i: units[i].hash(folder) for i in mine}

    found = {i: digest for part in gather_on_all_ranks(hash_mine, group) for i, digest in part.items()}
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
