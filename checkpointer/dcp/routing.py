"""Saving without a shared file system: boxes and files travel over the process group, once.

When the ranks do not all see the staging folder (see :mod:`checkpointer.runtime.nodes`),
every output file is written on rank 0's node (the "home" node), where publishing already
happens: a local ``output_dir`` is complete there, the Hub commit is made from there, and
an fsspec upload starts there. Each rank on another node sends its boxes to one rank of
the home node (senders are paired with home ranks to balance the bytes each home rank
writes), which writes them at their offsets; bytes travel in chunks of at most
:data:`CHUNK_BYTES` through one reused buffer on each side, so no rank holds more than its
own shards plus that buffer. Each byte crosses the network once.

Senders only send and receivers only receive, each in a fixed order, so the transfers
cannot deadlock; a peer that dies breaks the connection and the error names its node.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from checkpointer.errors import CheckpointError, CheckpointTransportError
from checkpointer.format.folder import local_files, make_dirs
from checkpointer.runtime.distributed import all_gather, on_all_ranks
from checkpointer.runtime.nodes import Nodes

CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Route:
    """One rank's part in moving boxes to the home node (a SavePlan's ``storage_data``).

    ``send_to``: the home rank this rank sends all its boxes to (None: it writes them itself);
    ``receive``: for each rank that sends to this one, in order, the items it sends.
    """

    nodes: Nodes
    send_to: int | None = None
    receive: tuple[tuple[int, tuple[WriteItem, ...]], ...] = ()


@dataclass
class Traffic:
    """The bytes this rank sent and received over the process group in the last save."""

    sent: int = 0
    received: int = 0


def item_bytes(item: WriteItem, itemsize: int) -> int:
    return math.prod(item.tensor_data.chunk.sizes) * itemsize


def plan_routes(plans: list[SavePlan], nodes: Nodes, itemsize: Callable[[WriteItem], int]) -> list[Route]:
    """Pair every rank off the home node with a home rank (the one with the fewest bytes so far)."""
    size = [sum(item_bytes(i, itemsize(i)) for i in plan.items) for plan in plans]
    load = {r: size[r] for r in nodes.home}
    incoming: dict[int, list[tuple[int, tuple[WriteItem, ...]]]] = {r: [] for r in nodes.home}
    send_to: dict[int, int] = {}
    for sender in sorted((r for r in range(len(plans)) if r not in nodes.home), key=lambda r: (-size[r], r)):
        receiver = min(nodes.home, key=lambda r: (load[r], r))
        send_to[sender] = receiver
        incoming[receiver].append((sender, tuple(plans[sender].items)))
        load[receiver] += size[sender]
    return [Route(nodes, send_to.get(r), tuple(sorted(incoming.get(r, []), key=lambda pair: pair[0]))) for r in range(len(plans))]


@dataclass
class Channel:
    """Chunked point-to-point transfers with one reused buffer (``group`` ranks)."""

    group: dist.ProcessGroup | None
    nodes: Nodes
    traffic: Traffic = field(default_factory=Traffic)
    _buffer: torch.Tensor | None = None

    def buffer(self, size: int) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.empty(min(CHUNK_BYTES, max(size, 1)), dtype=torch.uint8)
        elif self._buffer.numel() < min(CHUNK_BYTES, size):
            self._buffer = torch.empty(min(CHUNK_BYTES, size), dtype=torch.uint8)
        return self._buffer

    def send(self, runs: Iterable[memoryview], total: int, peer: int, what: str) -> None:
        """Send ``total`` bytes given as pieces of memory, in chunks packed into the buffer."""
        buffer = self.buffer(total)
        view, filled, left = memoryview(buffer.numpy()), 0, total
        for run in runs:
            run = run.cast("B") if run.format != "B" or run.ndim != 1 else run
            while len(run):
                take = min(len(run), min(len(buffer), left) - filled)
                view[filled : filled + take] = run[:take]
                filled, run = filled + take, run[take:]
                if filled == min(len(buffer), left):
                    self._transfer(lambda: dist.send(buffer[:filled], group=self.group, group_dst=peer), peer, what)
                    left, filled = left - filled, 0
        self.traffic.sent += total

    def receive(self, total: int, peer: int, what: str, write: Callable[[int, memoryview], None]) -> None:
        """Receive ``total`` bytes in chunks; ``write(offset, chunk)`` stores each one."""
        buffer = self.buffer(total)
        view, done = memoryview(buffer.numpy()), 0
        while done < total:
            n = min(len(buffer), total - done)
            self._transfer(lambda: dist.recv(buffer[:n], group=self.group, group_src=peer), peer, what)
            write(done, view[:n])
            done += n
        self.traffic.received += total

    def _transfer(self, step: Callable[[], object], peer: int, what: str) -> None:
        try:
            step()
        except (RuntimeError, OSError) as e:  # gloo reports a lost peer as a RuntimeError (DistBackendError)
            raise CheckpointTransportError(
                f"{what}: lost the connection to rank {peer} on {self.nodes.describe(self.nodes.node_of(peer))} "
                f"({str(e).splitlines()[0]}); nothing was published and the previous checkpoint is untouched"
            ) from e


def file_runs(path: Path, size: int) -> Iterable[memoryview]:
    """The bytes of a file in chunks (read through one reused buffer)."""
    buffer = memoryview(bytearray(min(CHUNK_BYTES, max(size, 1))))
    with open(path, "rb") as f:
        done = 0
        while done < size:
            n = f.readinto(buffer[: min(len(buffer), size - done)])
            if not n:
                raise CheckpointError(f"{path}: shorter than its {size} bytes while sending it")
            yield buffer[:n]
            done += n


def ship_folder(folder: Path, channel: Channel, me: int) -> None:
    """Move the files each node other than the home one wrote under ``folder`` to the home node (collective).

    Used for what DCP's own writer puts there (training state: one file per rank). The lead
    rank of each node lists its files and sends them to a home rank, which writes them under
    the same relative path; the node's copy is removed afterwards.
    """
    nodes = channel.nodes
    node = nodes.node_of(me)
    leads = [nodes.lead(n) for n in range(1, len(nodes.groups))]
    listing = on_all_ranks(lambda: local_files(folder) if me in leads and folder.is_dir() else {}, channel.group)
    listings = all_gather(listing, channel.group)
    receivers = {lead: nodes.home[i % len(nodes.home)] for i, lead in enumerate(leads)}

    def move() -> None:
        if me in leads:
            for name, size in listings[me].items():
                channel.send(file_runs(folder / name, size), size, receivers[me], f"sending {folder / name}")
        for lead, receiver in receivers.items():
            if receiver == me:
                for name, size in listings[lead].items():
                    receive_file(channel, folder / name, size, lead)

    on_all_ranks(move, channel.group)
    if node != 0 and me == nodes.lead(node):
        shutil.rmtree(folder, ignore_errors=True)


def receive_file(channel: Channel, path: Path, size: int, peer: int) -> None:
    make_dirs(path.parent)
    with open(path, "wb") as f:
        channel.receive(size, peer, f"receiving {path}", lambda _offset, chunk: f.write(chunk))
    if path.stat().st_size != size:
        raise CheckpointError(f"{path}: received {path.stat().st_size} of {size} bytes")
