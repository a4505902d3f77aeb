"""Which ranks share a file system: found with probe files, not assumed from host names.

A "node" here is a set of ranks that see the same files under a folder. Every rank writes
a probe file into one folder (the same path on every node), waits for the others, and
lists which probes it sees; ranks that see each other's probes share that folder. Host
names cannot tell this: containers on one host may have private disks, and a shared
file system spans hosts.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from checkpointer.errors import CheckpointError
from checkpointer.runtime.distributed import gather_on_all_ranks, is_distributed, on_all_ranks, on_rank_zero, rank, world_size


@dataclass(frozen=True)
class Nodes:
    """The ranks of a process group (group ranks), split into sets that share a folder.

    ``groups[0]`` holds rank 0; the others follow in order of their lowest rank.
    """

    groups: tuple[tuple[int, ...], ...]

    @classmethod
    def single(cls, world: int) -> Nodes:
        return cls((tuple(range(world)),))

    @property
    def shared(self) -> bool:
        """One node: every rank sees the same files (nothing needs to travel)."""
        return len(self.groups) == 1

    @property
    def home(self) -> tuple[int, ...]:
        """The ranks on rank 0's node."""
        return self.groups[0]

    def node_of(self, group_rank: int) -> int:
        return next(i for i, ranks in enumerate(self.groups) if group_rank in ranks)

    def lead(self, node: int) -> int:
        """The lowest rank of ``node`` (it does the node's one-per-node work)."""
        return self.groups[node][0]

    def describe(self, node: int) -> str:
        return f"node {node} (ranks {', '.join(map(str, self.groups[node]))})"


def probe_nodes(folder: Path, group: dist.ProcessGroup | None = None) -> Nodes:
    """Group the ranks by which of them see each other's files under ``folder`` (collective).

    ``folder`` is created where it is missing; the probes are removed afterwards.
    """
    if not is_distributed(group) or world_size(group) == 1:
        return Nodes.single(1)
    probes = Path(folder) / f".checkpointer-probe-{on_rank_zero(lambda: uuid.uuid4().hex, group)}"
    me = rank(group)

    def write_probe() -> None:
        probes.mkdir(parents=True, exist_ok=True)
        (probes / f"rank-{me}").write_text(str(me))

    on_all_ranks(write_probe, group)
    views = gather_on_all_ranks(lambda: tuple(sorted(int(p.name.removeprefix("rank-")) for p in probes.glob("rank-*"))), group)
    # every rank has listed its view before the gather returns: the probes may go
    if min(views[me]) == me:
        shutil.rmtree(probes, ignore_errors=True)
    return _nodes_from_views(views, folder)


def _nodes_from_views(views: list[tuple[int, ...]], folder: Path) -> Nodes:
    """Turn each rank's list of visible probes into node groups; views that do not partition the ranks are refused."""
    groups = sorted(set(views), key=min)
    for r, view in enumerate(views):
        if r not in view or any(views[other] != view for other in view):
            raise CheckpointError(
                f"{folder}: rank {r} sees the probe files of ranks {list(view)}, which do not all see the same ones: "
                "this folder is shared by some ranks in an inconsistent way (a stale network mount?)"
            )
    return Nodes(tuple(groups))
