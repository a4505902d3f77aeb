"""Reading a local folder when the ranks may not share a file system.

Every rank lists the folder (files and sizes). The same listing everywhere: every rank
reads it where it is (one shared file system, or identical copies), and nothing travels.
Present on rank 0's node only: the ranks of rank 0's node send its files, over the process
group in bounded chunks, into a copy in each other node's cache (once per node, as a
remote source is downloaded once per node), and those ranks read the copy. A folder
whose listing differs between nodes is refused on every rank: a checkpoint is never read
half from one copy and half from another.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from checkpointer.dcp.routing import Channel, file_runs, receive_file
from checkpointer.errors import CheckpointFormatError, CheckpointNotFoundError
from checkpointer.format.folder import local_files
from checkpointer.runtime.cache import cache_root, url_key
from checkpointer.runtime.distributed import gather_on_all_ranks, is_distributed, on_all_ranks, on_rank_zero, rank, world_size
from checkpointer.runtime.nodes import probe_nodes

Listing = dict[str, int] | None


def readable_here(path: Path, group: dist.ProcessGroup | None = None, needed: Callable[[], list[str]] | None = None) -> Path:
    """Where this rank reads the local folder ``path``: ``path`` itself, or this node's copy of rank 0's (collective).

    ``needed`` (run on rank 0) names the files a copy needs (default: all of them).
    """
    if not is_distributed(group) or world_size(group) == 1:
        return path
    listings: list[Listing] = gather_on_all_ranks(lambda: local_files(path) if path.is_dir() else None, group)
    if all(listing == listings[0] for listing in listings):
        return path  # one shared folder, identical copies, or missing everywhere (the caller says so)
    _check_copyable(path, listings)
    names = on_rank_zero(lambda: needed() if needed is not None else sorted(listings[0]), group)
    return _copy_from_rank_zero(path, {name: listings[0][name] for name in names}, listings, group)


def _check_copyable(path: Path, listings: list[Listing]) -> None:
    """The same error on every rank when rank 0 lacks the folder or another rank holds a different one."""
    if listings[0] is None:
        holders = [r for r, listing in enumerate(listings) if listing is not None]
        what = f"present only on ranks {holders}" if holders else "on no rank"
        raise CheckpointNotFoundError(f"{path}: no such folder on rank 0's node ({what}): a local folder is read from rank 0's node", file=str(path))
    for r, listing in enumerate(listings):
        if listing is not None and listing != listings[0]:
            raise CheckpointFormatError(f"{path}: differs between rank 0 and rank {r} ({_first_difference(listings[0], listing)}): "
                                        "the nodes hold different copies of this folder; refusing to read from both", file=str(path))  # fmt: skip


def _first_difference(ours: dict[str, int], theirs: dict[str, int]) -> str:
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            if name not in theirs or name not in ours:
                return f"{name} exists only on {'rank 0' if name in ours else 'the other'}"
            return f"{name} is {ours[name]} bytes on rank 0, {theirs[name]} on the other"
    return "same files"


def _copy_from_rank_zero(path: Path, files: dict[str, int], listings: list[Listing], group: dist.ProcessGroup | None) -> Path:
    """Send rank 0's ``files`` to one rank of each node (sharing a cache) that lacks them; returns where to read."""
    nodes = probe_nodes(cache_root(), group)
    me = rank(group)
    senders = [r for r in nodes.home if listings[r] is not None]
    lacking = [n for n in range(len(nodes.groups)) if any(listings[r] is None for r in nodes.groups[n])]
    if 0 in lacking:
        raise CheckpointNotFoundError(f"{path}: some ranks on rank 0's node do not see it: {nodes.describe(0)}", file=str(path))
    receivers = [nodes.lead(n) for n in lacking]
    shares = {s: sorted(files)[i :: len(senders)] for i, s in enumerate(senders)}
    copy = cache_root() / "node-copies" / url_key(str(path))
    channel = Channel(group, nodes)

    def move() -> None:
        if me in receivers and copy.exists():
            shutil.rmtree(copy)
        for receiver in receivers:
            if me in senders:
                for name in shares[me]:
                    channel.send(file_runs(path / name, files[name]), files[name], receiver, f"sending {path / name}")
            if me == receiver:
                for sender in senders:
                    for name in shares[sender]:
                        receive_file(channel, copy / name, files[name], sender)

    on_all_ranks(move, group)
    return path if listings[me] is not None else copy
