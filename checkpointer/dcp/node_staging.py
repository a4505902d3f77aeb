"""A save's staging folder when the ranks may not share a file system.

At the first save into a staging area, probe files tell which ranks share it (see
:mod:`checkpointer.runtime.nodes`); the answer is kept for later saves. With one node
nothing changes: every rank writes its own boxes and no byte travels. Otherwise the
files are assembled on rank 0's node (see :mod:`checkpointer.dcp.routing`): weights
through a :class:`Channel`, training state (written by DCP on each node) gathered file
by file, then listed and hashed by the ranks of that node only.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch.distributed as dist

from checkpointer.dcp.routing import Channel, Traffic, ship_folder
from checkpointer.format.folder import fresh_dir, local_files
from checkpointer.runtime.distributed import on_all_ranks, on_rank_zero, rank
from checkpointer.runtime.liveness import watching
from checkpointer.runtime.nodes import Nodes, probe_nodes


@dataclass(frozen=True)
class NodeStaging:
    """Where one save's staging folder lives on each node, and how its bytes reach rank 0's node."""

    folder: Path
    group: dist.ProcessGroup | None
    nodes: Nodes
    channel: Channel | None
    me: int

    @classmethod
    def of(cls, folder: Path, group: dist.ProcessGroup | None, known: dict[str, Nodes]) -> NodeStaging:
        """Probe (once per staging area, remembered in ``known``) and prepare each node's copy (collective).

        Rank 0 has created ``folder``; on other nodes, their lead rank creates a local one
        for what DCP writes per rank (training state) before it is gathered.
        """
        key = str(folder.parent)
        if key not in known:
            known[key] = probe_nodes(folder.parent, group)
        nodes = known[key]
        staging = cls(folder, group, nodes, None if nodes.shared else Channel(group, nodes), rank(group))
        if not nodes.shared:
            on_all_ranks(lambda: fresh_dir(staging.folder) if staging.leads_a_remote_node else None, group)
        return staging

    @property
    def leads_a_remote_node(self) -> bool:
        node = self.nodes.node_of(self.me)
        return node != 0 and self.me == self.nodes.lead(node)

    @property
    def traffic(self) -> Traffic:
        """Bytes this rank sent and received for this save (zero on one node)."""
        return self.channel.traffic if self.channel is not None else Traffic()

    def watching(self, what: str, token: str) -> ContextManager[None]:
        """On several nodes, a lost node becomes an error that names it."""
        return contextlib.nullcontext() if self.nodes.shared else watching(self.nodes, self.me, what, token)

    def gather(self, folder: Path) -> None:
        """Bring what every node wrote under ``folder`` (a subfolder of the staging folder) to rank 0's node."""
        if self.channel is not None:
            ship_folder(folder, self.channel, self.me)

    def listing(self, folder: Path) -> dict[str, int]:
        """The files under ``folder`` and their sizes, as rank 0's node has them."""
        return local_files(folder) if self.nodes.shared else on_rank_zero(lambda: local_files(folder), self.group)

    def remove_local_copies(self) -> None:
        """Remove other nodes' local staging folders (rank 0's is published or removed by the caller)."""
        if self.leads_a_remote_node:
            shutil.rmtree(self.folder, ignore_errors=True)
