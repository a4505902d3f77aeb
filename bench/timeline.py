"""When each step of a load or save starts and ends on every rank, timed without a profiler.

cProfile (``--profile``) charges every Python call it records, so Python-heavy steps look many
times slower than they are: at 300m W=4 it put the manifest's JSON encoding at 21 ms of CPU,
where encoding a manifest of the same size (750 ranges) takes 1.2 ms. Here each step in
:data:`STEPS` is wrapped to record when it starts and ends, from the barrier that starts the
operation, on every rank. A step is a method of one of our classes or a function of
``checkpointer.phases``, which every collective step goes through (its callers look it up as
``phases.<name>`` at each call). The report gives, per step and rank, the medians over the
repetitions of its first call's start and end in milliseconds; "wall" is the operation from
barrier to barrier, on the slowest rank.
"""

from __future__ import annotations

import functools
import gc
import importlib
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch.distributed as dist

# (module, "Class.method" or "function", label) in the order a save or a load reaches them
STEPS: tuple[tuple[str, str, str], ...] = (
    ("checkpointer.save", "Saver.save", "save"),
    ("checkpointer.phases", "plan", "weights' plan checked (first: collective)"),
    ("checkpointer.phases", "act", "staging folder made (first: rank 0, collective)"),
    ("checkpointer.save", "Saver._write_weights", "DCP save of the weights"),
    ("checkpointer.dcp.save_planner", "HFSavePlanner.create_local_plan", "local plan"),
    ("checkpointer.dcp.save_planner", "HFSavePlanner.create_global_plan", "global plan (coordinator)"),
    ("checkpointer.dcp.storage_writer", "SafetensorsWriter.prepare_global_plan", "files created (coordinator)"),
    ("checkpointer.dcp.storage_writer", "SafetensorsWriter.write_data", "boxes written and fsynced"),
    ("checkpointer.dcp.storage_writer", "SafetensorsWriter.finish", "digests and index (coordinator)"),
    ("checkpointer.phases", "publish", "published (rank 0, collective)"),
    ("checkpointer.save", "Saver._complete_and_publish", "manifest, fsync, rename (rank 0)"),
    ("checkpointer.load", "Loader.read", "DCP load of the weights"),
    ("checkpointer.dcp.load_planner", "HFLoadPlanner.create_local_plan", "read plan"),
    ("checkpointer.dcp.storage_reader", "SafetensorsReader.read_data", "shards read"),
)


class Timeline:
    """The steps' (label, start, end) of the operation under way, in seconds from its start."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.calls: list[tuple[str, float, float]] = []

    def wrap(self, function: Callable, label: str) -> Callable:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.calls.append((label, start - self.started, time.perf_counter() - self.started))

        return timed

    def first_calls(self) -> dict[str, tuple[float, float]]:
        """Each label's first call (start, end)."""
        first: dict[str, tuple[float, float]] = {}
        for label, start, end in self.calls:
            first.setdefault(label, (start, end))
        return first


@contextmanager
def steps_timed(timeline: Timeline) -> Iterator[None]:
    """Every step of :data:`STEPS` records its calls in ``timeline`` (the methods are restored after)."""
    originals = []
    for module, path, label in STEPS:
        owner_name, _, name = path.rpartition(".")
        owner = importlib.import_module(module)
        owner = getattr(owner, owner_name) if owner_name else owner
        original = vars(owner)[name]
        originals.append((owner, name, original))
        setattr(owner, name, timeline.wrap(original, label))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def time_steps(operation: Callable[[], Any]) -> tuple[float, dict[str, tuple[float, float]]]:
    """Run ``operation`` between two barriers with its steps timed: its wall seconds and each step's first call."""
    gc.collect()  # as bench.measure does: the last operation's result is freed before this one starts
    timeline = Timeline()
    with steps_timed(timeline):
        dist.barrier()
        timeline.started = time.perf_counter()
        operation()
        dist.barrier()
    return time.perf_counter() - timeline.started, timeline.first_calls()


def report(title: str, ranks: list[list[tuple[float, dict[str, tuple[float, float]]]]]) -> str:
    """A Markdown table from every rank's repetitions (``ranks[r][rep]`` = (wall, first calls)): medians in ms."""
    world = len(ranks)
    walls = [max(ranks[r][rep][0] for r in range(world)) for rep in range(len(ranks[0]))]
    spans: dict[str, list[list[tuple[float, float]]]] = defaultdict(lambda: [[] for _ in range(world)])
    for r, reps in enumerate(ranks):
        for _wall, first in reps:
            for label, span in first.items():
                spans[label][r].append(span)
    order = [label for *_, label in STEPS if label in spans]
    lines = [
        f"## {title}: when each step starts and ends (ms from the operation's first barrier, medians of {len(walls)})",
        "",
        "| step | " + " | ".join(f"rank {r}" for r in range(world)) + " |",
        "|---|" + "---|" * world,
    ]
    for label in order:
        cells = [_span_cell(spans[label][r]) for r in range(world)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"| wall (slowest rank) | {statistics.median(walls) * 1000:.1f} |" + " |" * (world - 1))
    return "\n".join(lines) + "\n"


def _span_cell(spans: list[tuple[float, float]]) -> str:
    if not spans:
        return "-"
    return f"{statistics.median(s for s, _ in spans) * 1000:.1f}-{statistics.median(e for _, e in spans) * 1000:.1f}"
