"""Naming the node that died: heartbeats in the rendezvous store while a multi-node step runs.

A killed node breaks its connections, so the others' collectives fail at once, but with
an error that names only a socket. While :func:`watching` runs, every rank records a
heartbeat in the job's TCP store (``MASTER_ADDR:MASTER_PORT``) each second; when the step
fails with a communication error, the survivors wait a few heartbeats and report the
ranks (and their node) whose heartbeats stopped. If the store itself is gone, it was on
the node of rank 0 (torchrun keeps it in node 0's agent).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from typing import Iterator

import torch.distributed as dist

from checkpointer.errors import CheckpointError, CheckpointTransportError
from checkpointer.runtime.nodes import Nodes

HEARTBEAT_S = 1.0
STALE_S = 5.0


def _store() -> dist.Store | None:
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    except (RuntimeError, OSError):
        return None


class _Heartbeat(threading.Thread):
    def __init__(self, store: dist.Store, key: str):
        super().__init__(daemon=True, name="checkpointer-heartbeat")
        self.store, self.key, self.stop = store, key, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.store.set(self.key, str(time.time()))
            except (RuntimeError, OSError):
                return
            self.stop.wait(HEARTBEAT_S)


def _silent_ranks(store: dist.Store, keys: list[str]) -> list[int]:
    time.sleep(STALE_S)
    now, silent = time.time(), []
    present = store.check(keys)
    for r, key in enumerate(keys):
        last = float(store.get(key)) if present or store.check([key]) else 0.0  # get() would wait for a missing key
        if now - last > STALE_S:
            silent.append(r)
    return silent


def _diagnosis(nodes: Nodes, store: dist.Store | None, keys: list[str]) -> str | None:
    """Which node died, or None when every rank still has a heartbeat (or nothing can tell)."""
    if store is None:
        return None
    try:
        store.check(keys[:1])  # raises when the store (on rank 0's node) is gone
        silent = _silent_ranks(store, keys)
    except (RuntimeError, OSError):
        return f"{nodes.describe(0)} is unreachable (its rendezvous store does not answer): that node died"
    dead = sorted({nodes.node_of(r) for r in silent})
    return f"{' and '.join(nodes.describe(n) for n in dead)} died (no heartbeat for {STALE_S:.0f} s)" if dead else None


@contextlib.contextmanager
def watching(nodes: Nodes, me: int, what: str, token: str) -> Iterator[None]:
    """Run a multi-node step; a communication failure becomes a CheckpointError naming the dead node.

    ``token`` must be the same on every rank and new for each step (it names the heartbeat keys).
    """
    store = _store()
    world = sum(len(g) for g in nodes.groups)
    keys = [f"checkpointer/heartbeat/{token}/{r}" for r in range(world)]
    beat = _Heartbeat(store, keys[me]) if store is not None else None
    if beat is not None:
        beat.start()
    try:
        yield
    except (CheckpointError, RuntimeError) as e:  # gloo: DistBackendError, "Connection closed by peer", timeouts
        diagnosis = _diagnosis(nodes, store, keys) if _is_connection_error(e) else None
        if diagnosis is None:
            raise
        raise CheckpointTransportError(f"{what}: {diagnosis}; nothing was published ({str(e).splitlines()[0]})") from e
    finally:
        if beat is not None:
            beat.stop.set()


def _is_connection_error(error: BaseException | None) -> bool:
    """A failure of the process group itself (not our own error): a RuntimeError from torch.distributed, maybe as a cause."""
    while error is not None:
        if isinstance(error, RuntimeError) and not isinstance(error, CheckpointError):
            return True
        error = error.__cause__
    return False
