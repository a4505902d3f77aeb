"""Medians, ratios and targets from the ranks' records; the printed tables and ``RESULTS.md``.

Per operation the time is the slowest rank's (the ranks leave the closing barrier
together, so they agree closely) and the memory is the worst rank's; both are medians
over the repetitions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from bench.methods import METHODS

MB = 2**20


@dataclass(frozen=True)
class Result:
    """One method at one size and world size, over its repetitions."""

    size: str
    model_bytes: int
    world: int
    key: str
    seconds: float  # median over repetitions of the slowest rank
    best: float  # the fastest repetition (of the slowest rank): what is left when others' load is least
    cpu: float  # median over repetitions of the largest per-rank CPU seconds
    growth: int  # median over repetitions of the largest per-rank peak RSS growth
    growth_share: float  # median over repetitions of max over ranks of growth / that rank's share
    share: int  # the largest per-rank share of the model, in bytes
    reps: int
    check: str
    moved_share: float | None = None  # median over repetitions of max over ranks of bytes read or written / (model / W)
    by_rep: dict[int, float] = field(default_factory=dict)  # repetition -> the slowest rank's seconds

    @property
    def seconds_per_gb(self) -> float:
        return self.seconds / (self.model_bytes / 1e9)


def summarize(size: str, model_bytes: int, world: int, ranks: list[list[dict[str, Any]]]) -> dict[str, Result]:
    """Method key -> its result, from every rank's records of one process group."""
    records = [r for rank_records in ranks for r in rank_records]
    reference = _reference_checksum(records)
    results = {}
    for key in sorted({r["key"] for r in records}, key=list(METHODS).index):
        mine = [r for r in records if r["key"] == key]
        reps = sorted({r["rep"] for r in mine})
        by_rep = [[r for r in mine if r["rep"] == rep] for rep in reps]
        seconds = _worst_per_rep(by_rep, lambda r: r["seconds"])
        results[key] = Result(
            size=size,
            model_bytes=model_bytes,
            world=world,
            key=key,
            seconds=statistics.median(seconds),
            best=min(seconds),
            cpu=statistics.median(_worst_per_rep(by_rep, lambda r: r["cpu"])),
            growth=int(statistics.median(_worst_per_rep(by_rep, lambda r: r["growth"]))),
            growth_share=statistics.median(_worst_per_rep(by_rep, lambda r: r["growth"] / r["share"])),
            share=max(r["share"] for r in mine),
            reps=len(reps),
            check=_check(key, mine, model_bytes, reference),
            moved_share=statistics.median(_worst_per_rep(by_rep, lambda r: r["moved"] * world / model_bytes)) if "moved" in mine[0] else None,
            by_rep=dict(zip(reps, seconds)),
        )
    return results


def _worst_per_rep(by_rep: list[list[dict[str, Any]]], value: Callable[[dict[str, Any]], float]) -> list[float]:
    """For each repetition, the largest ``value`` over the ranks."""
    return [max(value(r) for r in rep) for rep in by_rep]


def _reference_checksum(records: list[dict[str, Any]]) -> float | None:
    loads = [r["check"] for r in records if r["key"].startswith("load/")]
    preferred = [r["check"] for r in records if r["key"] == "load/floor"]
    return (preferred or loads or [None])[0]


def _check(key: str, records: list[dict[str, Any]], model_bytes: int, reference: float | None) -> str:
    """"ok" when every load (and copy) moved the same values as the floor and every save wrote every byte."""
    if not key.startswith("save/"):
        if reference is None:
            return "unchecked: no load in this run"
        bad = [r["check"] for r in records if not math.isclose(r["check"], reference, rel_tol=1e-9)]
        return "ok" if not bad else f"checksum {bad[0]:.6g} != {reference:.6g}"
    written = {r["check"] for r in records if r["rank"] == 0}
    return "ok" if written == {model_bytes} else f"wrote {sorted(written)} of {model_bytes} bytes"


@dataclass(frozen=True)
class GroupRun:
    """One spawned process group: its wall time and who used the CPU meanwhile."""

    size: str
    world: int
    wall: float
    ours: float  # CPU seconds of the benchmark's processes
    others: float  # CPU seconds of every other process on the machine
    available: float  # wall x cores


def groups_table(groups: list[GroupRun]) -> list[str]:
    header = ["size", "W", "wall s", "CPU s, this benchmark", "CPU s, other processes", "CPU s available"]
    rows = [[g.size, str(g.world), f"{g.wall:.0f}", f"{g.ours:.0f}", f"{g.others:.0f}", f"{g.available:.0f}"] for g in groups]
    return _table(header, rows)


# ---- tables --------------------------------------------------------------------------------


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def results_table(results: list[Result]) -> list[str]:
    """Every method at every world size: time, throughput, memory, check."""
    header = ["size", "W", "method", "time s", "best s", "GB/s", "CPU s (worst rank)", "peak growth MB (worst rank)", "growth / rank share", "bytes moved / (model / W)", "check"]
    rows = [
        [
            r.size,
            str(r.world),
            r.key,
            f"{r.seconds:.3f}",
            f"{r.best:.3f}",
            f"{r.model_bytes / 1e9 / r.seconds:.2f}",
            f"{r.cpu:.3f}",
            f"{r.growth / MB:.0f}",
            f"{r.growth_share:.2f}",
            "" if r.moved_share is None else f"{r.moved_share:.3f}",
            r.check,
        ]
        for r in results
    ]
    return _table(header, rows)


# Name, numerator, denominator. The "floor" columns of torchtune and torch bound what any
# method could show against them on this machine. Ours can beat the plain preadv floor only
# by asking the kernel for less work per page (it populates each shard's pages in one call):
# the populated floor does that too.
RATIOS: list[tuple[str, str, str]] = [
    ("load ours/torch", "load/ours", "load/torch"),
    ("load ours/floor", "load/ours", "load/floor"),
    ("load ours/floor populated", "load/ours", "load/floor_populated"),
    ("load first/floor", "load/ours_first", "load/floor"),
    ("load torchtune/ours", "load/torchtune", "load/ours"),
    ("load torchtune/floor", "load/torchtune", "load/floor"),
    ("save ours/floor", "save/ours", "save/floor"),
    ("save ours/floor+fsync", "save/ours", "save/floor_fsync"),
    ("save first/floor+fsync", "save/ours_first", "save/floor_fsync"),
    ("save torchtune/ours", "save/torchtune", "save/ours"),
    ("save torchtune/floor+fsync", "save/torchtune", "save/floor_fsync"),
    ("save torch/ours", "save/torch", "save/ours"),
    ("save torch/floor+fsync", "save/torch", "save/floor_fsync"),
    ("save async blocked/ours", "save/ours_async", "save/ours"),
    ("save async blocked/copy floor", "save/ours_async", "stage/floor"),
]


def ratios_table(results: list[Result], how: str = "medians") -> list[str]:
    """Time ratios per size and world size: of medians, of best times, or ``"paired"`` (see :func:`time_ratio`)."""
    index = {(r.size, r.world, r.key): r for r in results}
    cells = sorted({(r.size, r.world) for r in results}, key=lambda c: (results_order(c[0]), c[1]))
    rows = []
    for size, world in cells:
        row = [size, str(world)]
        for _, a, b in RATIOS:
            ra, rb = index.get((size, world, a)), index.get((size, world, b))
            row.append(f"{time_ratio(ra, rb, how):.2f}" if ra and rb else "-")
        rows.append(row)
    return _table(["size", "W"] + [name for name, _, _ in RATIOS], rows)


FIRST_USES = [("load", "load/ours_first", "load/ours"), ("save", "save/ours_first", "save/ours")]


def first_use_table(results: list[Result]) -> list[str]:
    """What a checkpointer's first load or save costs beyond its later ones, per cell."""
    index = {(r.size, r.world, r.key): r for r in results}
    cells = sorted({(r.size, r.world) for r in results}, key=lambda c: (results_order(c[0]), c[1]))
    rows = []
    for size, world in cells:
        for op, first_key, later_key in FIRST_USES:
            first, later = index.get((size, world, first_key)), index.get((size, world, later_key))
            if first and later:
                rows.append([size, str(world), op, f"{first.seconds:.3f}", f"{later.seconds:.3f}", f"{first.seconds - later.seconds:+.3f}", f"{first.best - later.best:+.3f}"])
    header = ["size", "W", "operation", "first s", "later s", "first-use cost s (medians)", "first-use cost s (best)"]
    return _table(header, rows) if rows else []


def time_ratio(a: Result, b: Result, how: str = "medians") -> float:
    """``a``'s time over ``b``'s: of their medians, of their best repetitions, or ``"paired"``.

    Paired is the median, over the repetitions both ran, of each repetition's own ratio: the two
    ran in the same repetition, at most minutes apart, so a slow spell of the machine that
    lasts a repetition slows both.
    """
    if how == "paired":
        return statistics.median(a.by_rep[rep] / b.by_rep[rep] for rep in sorted(a.by_rep.keys() & b.by_rep.keys()))
    return a.best / b.best if how == "best" else a.seconds / b.seconds


def results_order(size: str) -> int:
    from bench.models import SIZES

    return list(SIZES).index(size)


# ---- targets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    target: str
    size: str
    world: int
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'MISS'}  {self.size:>5} W={self.world}  {self.target}: {self.detail}"


Lookup = Callable[[str, int, str], "Result | None"]


def _time_ratio(target: str, a: str, b: str, limit: float, at_most: bool) -> Callable[[Lookup, str, int], Verdict | None]:
    """Target: time(a) / time(b) at most (or at least) ``limit``."""

    def check(get: Lookup, size: str, world: int) -> Verdict | None:
        ra, rb = get(size, world, a), get(size, world, b)
        if not (ra and rb):
            return None
        ratio = ra.seconds / rb.seconds
        passed = ratio <= limit if at_most else ratio >= limit
        detail = (
            f"{a} {ra.seconds:.3f} s / {b} {rb.seconds:.3f} s = {ratio:.2f} ({'<=' if at_most else '>='} {limit}); "
            f"paired {time_ratio(ra, rb, 'paired'):.2f}"
        )
        return Verdict(target, size, world, passed, detail)

    return check


def _memory(target: str, key: str, limit: float) -> Callable[[Lookup, str, int], Verdict | None]:
    """Target: the worst rank's peak growth at most ``limit`` times its share of the model."""

    def check(get: Lookup, size: str, world: int) -> Verdict | None:
        r = get(size, world, key)
        if not r:
            return None
        detail = f"{key} grows {r.growth / MB:.0f} MB = {r.growth_share:.2f} x its {r.share / MB:.0f} MB share (<= {limit})"
        return Verdict(target, size, world, r.growth_share <= limit, detail)

    return check


def _moved(target: str, key: str, limit: float) -> Callable[[Lookup, str, int], Verdict | None]:
    """Target: the bytes the worst rank read or wrote at most ``limit`` times its share of the model (model / W)."""

    def check(get: Lookup, size: str, world: int) -> Verdict | None:
        r = get(size, world, key)
        if not r or r.moved_share is None:
            return None
        detail = f"{key}: the worst rank moved {r.moved_share:.3f} x its share, model / W = {r.model_bytes / world / MB:.0f} MB (<= {limit})"
        return Verdict(target, size, world, r.moved_share <= limit, detail)

    return check


def _falls_as_1_over_w(target: str, key: str, slack: float) -> Callable[[Lookup, str, int], Verdict | None]:
    """Target: growth / share at W no more than at W=1 plus ``slack``: memory per rank falls as 1/W."""

    def check(get: Lookup, size: str, world: int) -> Verdict | None:
        r, one = get(size, world, key), get(size, 1, key)
        if not (r and one):
            return None
        detail = (
            f"{key} growth/share {r.growth_share:.2f} at W={world} vs {one.growth_share:.2f} at W=1 "
            f"({r.growth / MB:.0f} MB vs {one.growth / MB:.0f} MB / {world} = {one.growth / world / MB:.0f} MB; slack {slack})"
        )
        return Verdict(target, size, world, r.growth_share <= one.growth_share + slack, detail)

    return check


def _flat_per_gb(target: str, key: str, small: str, large: str, limit: float) -> Callable[[Lookup, str, int], Verdict | None]:
    """Target: seconds per GB at ``large`` at most ``limit`` times that at ``small``."""

    def check(get: Lookup, size: str, world: int) -> Verdict | None:
        if size != large:
            return None
        a, b = get(small, world, key), get(large, world, key)
        if not (a and b):
            return None
        ratio = b.seconds_per_gb / a.seconds_per_gb
        detail = f"{key} {b.seconds_per_gb:.3f} s/GB at {large} vs {a.seconds_per_gb:.3f} s/GB at {small} = {ratio:.2f} (<= {limit})"
        return Verdict(target, size, world, ratio <= limit, detail)

    return check


TARGET_WORLDS = (2, 4)
ALL_WORLDS = (1, 2, 4)

# Each target and the world sizes it is judged at.
TARGETS = [
    (_time_ratio("load at most 1.05x the preadv floor", "load/ours", "load/floor", 1.05, at_most=True), ALL_WORLDS),
    (_time_ratio("load at most 1.25x torch's reader", "load/ours", "load/torch", 1.25, at_most=True), TARGET_WORLDS),
    (_time_ratio("load at least 5x faster than torchtune", "load/torchtune", "load/ours", 5.0, at_most=False), TARGET_WORLDS),
    (_memory("load peak growth at most 1.1x the rank's share", "load/ours", 1.1), TARGET_WORLDS),
    (_time_ratio("save at most 1.1x the durable floor (save_file + fsync)", "save/ours", "save/floor_fsync", 1.1, at_most=True), ALL_WORLDS),
    (_time_ratio("save at least 5x faster than torchtune", "save/torchtune", "save/ours", 5.0, at_most=False), TARGET_WORLDS),
    (_time_ratio("save at least 5x faster than torch's consolidating writer", "save/torch", "save/ours", 5.0, at_most=False), TARGET_WORLDS),
    (_time_ratio("async save blocks at most 10% of a full save", "save/ours_async", "save/ours", 0.10, at_most=True), ALL_WORLDS),
    (_memory("save peak growth at most 0.25x the rank's share", "save/ours", 0.25), TARGET_WORLDS),
    *(
        (_moved(f"{key} bytes per rank at most 1.05x its share", key, 1.05), TARGET_WORLDS)
        for key in ("load/ours_tp", "load/ours_fsdp_tp", "save/ours_tp", "save/ours_fsdp_tp")
    ),
    (_falls_as_1_over_w("load memory per rank falls as 1/W", "load/ours", 0.1), TARGET_WORLDS),
    (_falls_as_1_over_w("save memory per rank falls as 1/W", "save/ours", 0.1), TARGET_WORLDS),
    (_flat_per_gb("load time per GB flat from 300m to 1b", "load/ours", "300m", "1b", 1.25), TARGET_WORLDS),
    (_flat_per_gb("save time per GB flat from 300m to 1b", "save/ours", "300m", "1b", 1.25), TARGET_WORLDS),
]


def verdicts(results: list[Result]) -> list[Verdict]:
    """Every target at every measured size and at the world sizes it is judged at."""
    index = {(r.size, r.world, r.key): r for r in results}

    def get(size: str, world: int, key: str) -> Result | None:
        return index.get((size, world, key))

    sizes = sorted({r.size for r in results}, key=results_order)
    found = (check(get, size, world) for check, worlds in TARGETS for size in sizes for world in worlds)
    return [v for v in found if v is not None]


def methods_list(keys: Iterable[str]) -> list[str]:
    return [f"- `{key}`: {METHODS[key].description}" for key in keys]
