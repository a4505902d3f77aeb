"""Run a function on N real processes joined by a process group (gloo by default), for tests and demos.

Each process gets its own interpreter (``spawn``), a TCP rendezvous on a free loopback
port, and a process group with a bounded timeout (with NCCL, rank r uses GPU r). Results
come back in rank order; an exception on any rank is raised in the caller with that rank's
traceback; a process that does not finish in time is killed and reported, so a test fails
instead of hanging.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from checkpointer.runtime.distributed import free_port


class RankFailed(RuntimeError):
    """A rank raised; the message carries its traceback."""


def _worker(
    rank: int, world: int, port: int, timeout_s: float, backend: str, fn: Callable, args: tuple, results: Any
) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        if "nccl" in backend:
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, world, *args)
        dist.barrier()
        results.put((rank, True, _to_bytes(value)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_bytes(value: Any) -> bytes:
    """Tensors in a queue travel as file descriptors that die with the child: send bytes."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def run_on_ranks(
    fn: Callable, world: int, *args: Any, timeout: float = 180.0, pg_timeout: float = 60.0, backend: str = "gloo"
) -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` processes; return the results by rank.

    ``backend`` is ``init_process_group``'s (e.g. ``"cuda:nccl,cpu:gloo"``, one GPU per rank).

    ``fn`` must be importable (a module-level function); its results must be tensors,
    numbers, strings and containers of them (they are read back with ``weights_only``).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, pg_timeout, backend, fn, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    collected: dict[int, tuple[bool, Any]] = {}
    finished = False
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(collected) < world:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(collected))} did not finish in {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
                collected[rank] = (ok, value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
        finished = True
    finally:
        for p in procs:  # after a failure the others may be stuck in a collective: end them at once
            p.join(timeout=10 if finished else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    failures = [(r, v) for r, (ok, v) in sorted(collected.items()) if not ok]
    if failures:
        raise RankFailed("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failures))
    return [_from_bytes(collected[r][1]) for r in range(world)]
