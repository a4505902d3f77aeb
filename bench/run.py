"""``python -m bench.run``: load and save a Hugging Face model with every method, on 1, 2 and 4 ranks.

For each size, the base model is written once into ``bench/work/`` (reused afterwards);
for each world size, one spawned gloo process group runs every method ``--reps`` times
(with ``--device cuda``, NCCL and gloo, rank r's model on GPU r). Prints a table of medians,
ratios and targets, and writes them to ``bench/RESULTS.md`` (``bench/RESULTS-cuda.md``).

Examples::

    python -m bench.run                         # 300M, W = 1, 2, 4, 5 repetitions (make bench)
    python -m bench.run --size 300m 1b          # both sizes, so time per GB can be compared
    python -m bench.run --size 20m --worlds 2 --methods load/ours load/torch --profile load/ours
    python -m bench.run --size 300m --worlds 4 --reps 9 --methods save/ours --timeline save/ours --results -
    python -m bench.run --device cuda --size 300m 1b --worlds 1   # on a machine with a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import CpuUse
from bench.methods import METHODS
from bench.models import SIZES, ensure_base_model, model_bytes
from bench.remote import run_remote
from bench.report import (
    GroupRun,
    Result,
    first_use_table,
    groups_table,
    methods_list,
    ratios_table,
    results_table,
    summarize,
    verdicts,
)
from bench.worker import Settings, run_world

HERE = Path(__file__).resolve().parent
NOTES = HERE / "NOTES.md"  # hand-written analysis, copied into RESULTS.md

# Every allocation above 128 KiB gets fresh pages from mmap and goes back on free, so a
# "fresh" model's shards are really untouched and peak RSS counts what each method needs
# (glibc would otherwise reuse freed heap pages for tensors under its 32 MiB dynamic limit).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}

# --device: (the process group's backend, the default report)
DEVICES = {"cpu": ("gloo", HERE / "RESULTS.md"), "cuda": ("cuda:nccl,cpu:gloo", HERE / "RESULTS-cuda.md")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["300m"], choices=list(SIZES), help="model sizes (default: 300m)")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4], help="world sizes (default: 1 2 4)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each operation (default: 5)")
    parser.add_argument("--device", choices=list(DEVICES), default="cpu", help="where the models live (cuda: rank r on GPU r)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="default: all")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="base models and outputs (default: bench/work)")
    parser.add_argument("--results", type=Path, help="the report (default: bench/RESULTS.md, with cuda RESULTS-cuda.md); '-': none")
    parser.add_argument("--profile", choices=list(METHODS), help="run this method twice more under cProfile on rank 0 (wall clock, CPU time)")
    parser.add_argument(
        "--timeline", choices=list(METHODS), help="run this method --reps times more, timing when each step starts and ends on every rank"
    )
    parser.add_argument("--raw", action="store_true", help="also print every operation on every rank")
    parser.add_argument("--no-remote", action="store_true", help="skip the remote I/O part (local Hub and S3 server)")
    parser.add_argument("--from-json", type=Path, help="measure nothing: write the report of a run saved in this file")
    parser.add_argument(
        "--notes-only", action="store_true", help="measure nothing: put the current bench/NOTES.md into --results"
    )
    args = parser.parse_args(argv)
    args.results = args.results or DEVICES[args.device][1]
    return args


def check_device(device: str, worlds: list[int]) -> None:
    """Refuse a device this machine lacks, or more ranks than it has GPUs, before anything runs."""
    import torch

    if device != "cuda":
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if max(worlds) > gpus:
        raise SystemExit(f"--device cuda: --worlds {' '.join(map(str, worlds))} needs {max(worlds)} GPUs, this machine has {gpus}")


@dataclass
class Measured:
    """Everything one run measured: every rank's records of every process group, and its CPU use."""

    groups: list[GroupRun] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)  # {"size", "model_bytes", "world", "ranks"}
    where: dict[str, Any] = field(default_factory=dict)  # machine, code and niceness, taken when measuring

    @property
    def results(self) -> list[Result]:
        return [r for g in self.raw for r in summarize(g["size"], g["model_bytes"], g["world"], g["ranks"]).values()]

    @property
    def device(self) -> str:
        """Where the models lived (runs saved before ``--device`` existed ran on the CPU)."""
        return self.where.get("device", "cpu")

    def extend(self, other: Measured) -> None:
        self.groups += other.groups
        self.raw += other.raw
        self.where = self.where or other.where

    def save(self, path: Path, argv: list[str], minutes: float) -> None:
        """Everything needed to write the report again (``--from-json``)."""
        groups = [asdict(g) for g in self.groups]
        data = {"argv": argv, "minutes": minutes, "groups": groups, "raw": self.raw, "where": self.where}
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> tuple[Measured, list[str], float]:
        data = json.loads(path.read_text())
        measured = cls([GroupRun(**g) for g in data["groups"]], data["raw"], data.get("where", {}))
        return measured, data["argv"], data["minutes"]


def run_size(
    size: str,
    worlds: list[int],
    reps: int,
    methods: list[str],
    work: Path,
    profile: str | None = None,
    raw: bool = False,
    device: str = "cpu",
    timeline: str | None = None,
) -> Measured:
    """Every method at every world size for one model size (the base model is made or reused)."""
    from checkpointer.testing.multiprocess import run_on_ranks

    base = ensure_base_model(SIZES[size], work)
    measured = Measured(where={"machine": machine(), "code": source(), "niceness": os.nice(0), "device": device})
    total_bytes = model_bytes(base)
    for world in worlds:
        settings = Settings(
            base=str(base),
            out=str(work / f"out-{size}-w{world}"),
            methods=tuple(methods),
            reps=reps,
            threads=max(1, (os.cpu_count() or 1) // world),
            device=device,
            profile=profile,
            profile_to=str(work),
            timeline=timeline,
        )
        with CpuUse() as cpu:
            ranks = run_on_ranks(run_world, world, settings, timeout=3600.0, pg_timeout=1800.0, backend=DEVICES[device][0])
        shutil.rmtree(settings.out, ignore_errors=True)
        measured.groups.append(GroupRun(size, world, cpu.wall, cpu.ours, cpu.others, cpu.available))
        print(f"  {size} W={world}: {cpu.wall:.0f} s; CPU s: ours {cpu.ours:.0f}, other processes {cpu.others:.0f}", flush=True)
        if raw:
            print_raw(ranks)
        measured.raw.append({"size": size, "model_bytes": total_bytes, "world": world, "ranks": ranks})
    return measured


def print_raw(ranks: list[list[dict]]) -> None:
    """One line per operation per rank, in the order they ran."""
    for records in zip(*ranks):  # the ranks ran the same operations in the same order
        samples = "  ".join(f"r{r['rank']} {r['seconds']:.3f} s (CPU {r['cpu']:.3f}) {r['growth'] / 2**20:.0f} MB" for r in records)
        print(f"    {records[0]['key']:<20} rep {records[0]['rep']}: {samples}")


def machine() -> str:
    """Cores, memory and library versions of this machine."""
    import safetensors
    import torch
    import torchtune

    mem_kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {mem_kb / 2**20:.0f} GiB RAM, {gpus()}; Linux {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchtune {torchtune.__version__}, "
        f"safetensors {safetensors.__version__}"
    )


def gpus() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no GPU"
    return ", ".join(f"GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))


def source() -> str:
    """Where ``checkpointer`` was imported from, and at which commit."""
    import subprocess

    import checkpointer

    root = Path(checkpointer.__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"`checkpointer` from {root}"
    return f"`checkpointer` from {root} at commit {commit}{' with uncommitted changes' if dirty else ''}"


def command(argv: list[str]) -> str:
    return " ".join(["python -m bench.run", *map(shlex.quote, argv)])


def report(measured: Measured, argv: list[str], minutes: float) -> list[str]:
    """The whole report, as Markdown lines (also printed)."""
    results = measured.results
    reps = sorted({r.reps for r in results})
    lines = [
        "# Benchmark: loading and saving a sharded Hugging Face checkpoint",
        "",
        f"Command (repository root): `{command(argv)}` — {minutes:.1f} minutes in all.",
        "",
        f"Machine: {measured.where.get('machine', 'not recorded')}.",
        "",
        f"Code: {measured.where.get('code', 'not recorded')}.",
        "",
        "How it is measured:",
        "",
        "- Base model: a random Llama-architecture model (`LLAMA3`: untied embeddings, GQA, RoPE), bf16, in three "
        "safetensors shards plus an index, written once into `bench/work/` and reused.",
        f"- Each world size is one spawned {DEVICES[measured.device][0]} process group, the models on "
        f"{measured.device}, running every method; repetitions are the outer "
        "loop, each with the methods in its own shuffled order; after each operation its output is deleted and "
        "`os.sync()` flushes dirty pages, untimed. Time: barrier to barrier, the slowest rank. Memory: per rank, peak RSS growth (`VmHWM` after, reset "
        "via `/proc/self/clear_refs`, minus `VmRSS` before), the worst rank; `share` is that rank's bytes of the model. "
        "Every load starts from a fresh model whose shards are allocated but untouched, so filling them counts "
        "(a load cannot grow less than 1.0x its share); saves start from a loaded model.",
        f"- Medians of {', '.join(map(str, reps))} repetitions. Loads are checked by a checksum of everything loaded "
        "(the same for every method), saves by the tensor bytes in the files written.",
        "- Page cache: the base files were in the page cache for every load (they are written or read just before, "
        "and 24 GB of RAM holds them), so loads measure memory-to-memory copies, not the disk. Saves write into the "
        "page cache; ours and torch's writer fsync their files, torchtune and the `save_file` floor do not "
        "(`save/floor_fsync` does).",
        f"- The benchmark ran at niceness {measured.where.get('niceness', '(not recorded)')} (negative: ahead of other jobs on the machine; see the CPU table "
        "below for how much they still took).",
        "- torch threads per rank: cores / W. W = 4 on 2 cores oversubscribes the CPU (4 processes on 2 cores): "
        "expected; its times are CPU-bound and show contention, not scaling.",
        f"- `{' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}` in every rank, so that freed memory is returned "
        "and fresh tensors are really untouched (same for every method).",
        "",
        "## Methods",
        "",
        *methods_list(dict.fromkeys(r.key for r in results)),
        "",
        "## Results",
        "",
        *results_table(results),
        "",
        "## Time ratios (of the medians)",
        "",
        *ratios_table(results),
        "",
        "The same ratios of the best repetitions (contention from other processes only ever adds time):",
        "",
        *ratios_table(results, how="best"),
        "",
        "The same ratios paired: the median over repetitions of each repetition's own ratio (the two methods ran "
        "in the same repetition, so a slow spell of the machine that lasts a repetition slows both):",
        "",
        *ratios_table(results, how="paired"),
        "",
        "## What a first load or save costs",
        "",
        "A checkpointer's first load also reads `config.json` and every safetensors header, checks the manifest "
        "and takes the output folder's lock (`load/ours_first`); its first save also opens the base, probes which "
        "ranks share the output folder and plans the files (`save/ours_first`). Its later loads and saves reuse "
        "them (`load/ours`, `save/ours`: the ones compared with the floors, which know the layout too).",
        "",
        *first_use_table(results),
        "",
        "## Process groups: wall time and CPU use",
        "",
        "Other processes shared these 2 cores during the run; their CPU seconds show how much.",
        "",
        *groups_table(measured.groups),
        "",
        "## Targets",
        "",
        "```",
        *[v.line() for v in verdicts(results)],
        "```",
    ]
    return lines


NOTES_MARK = "<!-- bench/NOTES.md, copied by python -m bench.run -->"


def write_results(path: Path, measured_lines: list[str], with_notes: bool = True) -> None:
    """``path`` = the measured report, then the hand-written notes (if any; they analyse the CPU run)."""
    notes = [NOTES_MARK, "", NOTES.read_text().rstrip()] if with_notes and NOTES.exists() else []
    path.write_text("\n".join([*measured_lines, "", *notes]).rstrip() + "\n")


def refresh_notes(path: Path) -> None:
    """Replace the notes part of an existing report with the current ``NOTES.md``."""
    measured = path.read_text().split(NOTES_MARK)[0].rstrip().splitlines()
    write_results(path, measured)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.notes_only:
        refresh_notes(args.results)
        return
    if args.from_json:
        measured, argv, minutes = Measured.load(args.from_json)
        remote: list[str] = []  # a saved run holds the local measurements only
    else:
        check_device(args.device, args.worlds)
        measured, minutes = measure_all(args)
        measured.save(args.work / LAST_RUN, argv, minutes)
        remote = [] if args.no_remote else run_remote(ensure_base_model(SIZES[args.size[0]], args.work), args.work, min(args.reps, 3))
    lines = report(measured, argv, minutes) + remote
    print("\n".join(lines))
    if str(args.results) != "-":
        write_results(args.results, lines, with_notes=measured.device == "cpu")
        print(f"\nwrote {args.results}")


LAST_RUN = "last-run.json"  # in --work: every record of the latest run


def measure_all(args: argparse.Namespace) -> tuple[Measured, float]:
    """Every size of the command line; and how many minutes it took."""
    os.environ.update(MALLOC_ENV)  # inherited by the spawned ranks
    started = time.perf_counter()
    measured = Measured()
    for size in args.size:
        measured.extend(run_size(size, args.worlds, args.reps, args.methods, args.work, args.profile, args.raw, args.device, args.timeline))
    return measured, (time.perf_counter() - started) / 60


if __name__ == "__main__":
    main()
