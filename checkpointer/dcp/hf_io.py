"""The two DCP calls: read HF safetensors into local shards, write local shards into HF files.

A read needs no global plan (each rank reads its own boxes), so it runs DCP on each rank
alone and joins the ranks once, at the end, to raise any rank's error on all of them (a
destination on the meta device included): one collective instead of DCP's three. A write
keeps DCP's collectives: the coordinator creates the files before anyone writes, and
gathers the digests at the end.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from checkpointer.dcp.load_planner import HFLoadPlanner
from checkpointer.dcp.one_entry import wrapped
from checkpointer.dcp.routing import Channel
from checkpointer.dcp.save_planner import HFSavePlanner
from checkpointer.dcp.storage_reader import SafetensorsReader
from checkpointer.dcp.storage_writer import SafetensorsWriter
from checkpointer.errors import CheckpointArgumentError, CheckpointError
from checkpointer.format.digests import Digests
from checkpointer.format.file_layout import FileLayout
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.format.safetensors import TensorSpec
from checkpointer.mapping.key_maps import KeyMap
from checkpointer.mapping.pieces import Placement
from checkpointer.runtime.distributed import dcp_errors, is_distributed, on_all_ranks

T = TypeVar("T")


@dataclass(frozen=True)
class IOStats:
    """What the last load or save moved on this rank."""

    bytes: int
    seconds: float
    location: str

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


class quiet_dcp(warnings.catch_warnings):
    """DCP warns on every single-process call that it assumes no process group; we mean it."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return self


def read_hf_tensors(
    state_dict: dict[str, Any],
    files: CheckpointFiles,
    key_map: KeyMap,
    group: dist.ProcessGroup | None,
    sources: dict[str, Placement] | None = None,
) -> IOStats:
    """Fill ``state_dict`` (torchtune keys, plain or DTensor values) in place from ``files``.

    ``sources``: where each key lives, when the caller has matched them already (it may
    then read only some of the keys the files hold).
    """
    reader, started = SafetensorsReader(files), time.perf_counter()

    def read() -> None:
        check_materialized(state_dict)
        _alone(lambda: dcp.load(wrapped(state_dict), storage_reader=reader, planner=HFLoadPlanner(key_map, sources), no_dist=True))

    with quiet_dcp(), torch.no_grad():
        on_all_ranks(read, group)
    return IOStats(reader.bytes_read, time.perf_counter() - started, files.folder.describe())


def check_materialized(state_dict: dict[str, Any]) -> None:
    """Refuse destinations on the meta device: they have no memory to read into."""
    meta = [key for key, value in state_dict.items() if isinstance(value, torch.Tensor) and value.is_meta]
    if meta:
        raise CheckpointArgumentError(
            f"{len(meta)} model tensors are on the meta device (e.g. {meta[0]}): call model.to_empty(device=...) first",
            key=meta[0],
        )


def _alone(call: Callable[[], T]) -> T:
    """Run a DCP call on this rank alone (``no_dist``), raising the error DCP wrapped as itself."""
    try:
        return call()
    except CheckpointException as e:
        errors = [failure for failure, _trace in e.failures.values()]
        if errors and isinstance(errors[0], Exception):
            raise errors[0] from None
        raise CheckpointError(str(e)) from None


@dataclass(frozen=True)
class WritePlan:
    """What every rank writes, the same on each: the HF tensors, where each torchtune tensor goes, the files' bytes."""

    key_map: KeyMap
    specs: dict[str, TensorSpec]
    destinations: dict[str, Placement]
    file_layout: FileLayout
    subset: bool = False  # the state dict may hold more than these files take (see HFSavePlanner)

    def only(self, file: str) -> WritePlan:
        """The plan of the one file ``file`` (to write the files one at a time); its destinations are the torchtune keys with rows there."""
        one = self.file_layout.subset(file)
        destinations = {t: d for t, d in self.destinations.items() if any(self.file_layout.entries[h].file == file for h in d.hf_keys)}
        return WritePlan(self.key_map, {h: self.specs[h] for h in one.entries}, destinations, one, subset=True)


def write_hf_tensors(
    state_dict: dict[str, Any],
    plan: WritePlan,
    folder: Path,
    finish: Callable[[Path], None],
    group: dist.ProcessGroup | None,
    channel: Channel | None = None,
) -> tuple[IOStats, Digests]:
    """Write ``state_dict`` into the files ``plan`` lays out, in ``folder``; ``finish`` runs last on rank 0.

    With ``plan.subset`` (one file of a larger plan), ``state_dict`` may hold more than the file takes.
    Returns this rank's stats and, on rank 0, the digests of every file written (computed
    from memory by the ranks that wrote each box, or sent it; empty on the other ranks).
    With a ``channel`` (the ranks share no file system), ranks off rank 0's node send their boxes there.
    """
    writer, started = SafetensorsWriter(folder, plan.file_layout, finish, channel), time.perf_counter()
    with quiet_dcp(), dcp_errors(group), torch.no_grad():
        dcp.save(
            wrapped(state_dict),
            storage_writer=writer,
            planner=HFSavePlanner(plan.key_map, plan.specs, plan.destinations, plan.subset),
            process_group=group,
            no_dist=not is_distributed(),
        )
    return IOStats(writer.bytes_written, time.perf_counter() - started, str(folder)), writer.digests
