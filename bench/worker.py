"""What each rank of one spawned process group runs: every method, every repetition.

Repetitions are the outer loop, and each repetition runs the methods in its own
shuffled order (the same on every rank), so that drift and what one method leaves behind
for the next (on this VM, memory freed seconds ago is several times faster to touch again
than memory the host has taken back) spread over all methods alike. Each operation is checked after it is timed: a load (or a copy) by a checksum of
everything the ranks loaded (a sum, so the same for torchtune and HF row orders), a
save by the tensor bytes found in the files it wrote.
"""

from __future__ import annotations

import cProfile
import io
import logging
import math
import pstats
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from bench.measure import measure
from bench.methods import METHODS, Context, Method, Unfinished, discard, local_tensor
from bench.timeline import report, time_steps
from checkpointer.format.folder import LocalFolder
from checkpointer.format.hf_files import read_header


@dataclass(frozen=True)
class Settings:
    """What the ranks are told to do (plain values: it is pickled to spawned processes)."""

    base: str
    out: str
    methods: tuple[str, ...]
    reps: int
    threads: int
    device: str = "cpu"  # or "cuda": rank r's model on GPU r
    profile: str | None = None  # a method key to run twice more under cProfile on rank 0 (wall, CPU)
    profile_to: str | None = None  # where profiles and timelines go
    timeline: str | None = None  # a method key to run ``reps`` times more with its steps timed on every rank


def run_world(rank: int, world: int, settings: Settings) -> list[dict[str, Any]]:
    """Measure every method ``settings.reps`` times; one record per operation on this rank."""
    torch.set_num_threads(settings.threads)
    logging.getLogger("torchtune").setLevel(logging.WARNING)  # one INFO line per file saved
    ctx = Context(rank, world, Path(settings.base), Path(settings.out), settings.device)
    methods = [METHODS[key] for key in settings.methods if METHODS[key].applies(world, ctx.config)]
    if any(m.op != "load" for m in methods):
        ctx.loaded_model, ctx.loaded_hf_shards  # noqa: B018 - the save sources exist before any timing
    records = [_run_once(ctx, m, rep) for rep in range(settings.reps) for m in _shuffled(methods, rep)]
    if settings.profile:
        _profile(ctx, METHODS[settings.profile], Path(settings.profile_to or settings.out))
    if settings.timeline:
        _timeline(ctx, METHODS[settings.timeline], settings.reps, Path(settings.profile_to or settings.out))
    return records


def _shuffled(methods: list[Method], rep: int) -> list[Method]:
    """``methods`` in an order that depends only on ``rep``."""
    order = list(methods)
    random.Random(rep).shuffle(order)
    return order


def _run_once(ctx: Context, method: Method, rep: int) -> dict[str, Any]:
    operation = method.prepare(ctx, rep)
    sample, result = measure(operation)
    if isinstance(result, Unfinished):
        result = result.finish()
    check = _saved_bytes(ctx, result) if method.op == "save" else _checksum(result)
    del operation, result
    discard(ctx, ctx.out_dir(method.key, rep))
    moved, ctx.moved = ctx.moved, None
    record = {"key": method.key, "rep": rep, "rank": ctx.rank, "share": ctx.share, "check": check, **asdict(sample)}
    return record | ({"moved": moved} if moved is not None else {})


def _checksum(loaded: nn.Module | dict[str, Any]) -> float:
    """The sum of every element of a model's or state dict's shards on every rank (in float64)."""
    state_dict = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    total = torch.zeros((), dtype=torch.float64)
    for value in state_dict.values():
        total += local_tensor(value).sum(dtype=torch.float64).cpu() / _copies(value)
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total)


def _copies(value: torch.Tensor) -> int:
    """On how many ranks each element of ``value`` lives: its replicated mesh dims, times the ranks outside its mesh.

    (A plain tensor lives on every rank; FSDP2 over TP shards a norm over ``dp`` only, so each ``tp`` rank holds a copy.)
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not isinstance(value, DTensor):
        return world
    mesh = value.device_mesh
    return world // mesh.size() * math.prod(mesh.size(d) for d, p in enumerate(value.placements) if p.is_replicate())


def _saved_bytes(ctx: Context, folder: Path) -> int:
    """Tensor bytes in the safetensors files of ``folder`` (counted on rank 0, 0 elsewhere)."""
    if ctx.rank != 0:
        return 0
    with LocalFolder(folder) as saved:  # closed: the folder is deleted next, and its space must be freed
        return sum(e.nbytes for file in folder.glob("*.safetensors") for e in read_header(saved, file.name).tensors.values())


def _profile(ctx: Context, method: Method, where: Path) -> None:
    """Run ``method`` twice more under cProfile on rank 0, timing wall clock then CPU; write the top functions."""
    sections = [_profiled(ctx, method, clock, label) for clock, label in ((time.perf_counter, "wall"), (time.process_time, "CPU"))]
    if ctx.rank == 0:
        where.mkdir(parents=True, exist_ok=True)
        (where / f"profile-{method.key.replace('/', '-')}-w{ctx.world}.txt").write_text("\n".join(sections))


def _timeline(ctx: Context, method: Method, reps: int, where: Path) -> None:
    """Run ``method`` ``reps`` times more with its steps timed on every rank; rank 0 writes the table."""
    mine = []
    for _ in range(reps):
        operation = method.prepare(ctx, rep=-1)
        mine.append(time_steps(operation))
        del operation
        discard(ctx, ctx.out_dir(method.key, -1))
    ranks: list[Any] = [None] * ctx.world
    dist.all_gather_object(ranks, mine)
    if ctx.rank == 0:
        where.mkdir(parents=True, exist_ok=True)
        name = f"timeline-{method.key.replace('/', '-')}-{ctx.base.name}-w{ctx.world}.md"  # e.g. timeline-save-ours-base-300m-w4.md
        (where / name).write_text(report(f"{method.key}, {ctx.base.name}, W={ctx.world}", ranks))


def _profiled(ctx: Context, method: Method, clock: Callable[[], float], label: str) -> str:
    operation = method.prepare(ctx, rep=-1)
    profiler = cProfile.Profile(clock) if ctx.rank == 0 else None
    dist.barrier()
    if profiler:
        profiler.enable()
    operation()
    if profiler:
        profiler.disable()
    discard(ctx, ctx.out_dir(method.key, -1))
    if not profiler:
        return ""
    text = io.StringIO()
    text.write(f"===== {method.key}, W={ctx.world}, rank 0, {label} time =====\n")
    stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
    stats.print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
    return text.getvalue()
