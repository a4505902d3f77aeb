"""The registry of benchmarked methods: each loads or saves the base model on every rank.

A method is a small function ``prepare(ctx, rep) -> operation``: ``prepare`` sets up what
the operation needs (a fresh model with untouched shards, an output folder) and is not
timed; the returned zero-argument ``operation`` is what is timed, and returns what it
loaded into (a model or a state dict) or where it saved (a folder), for checking.

- ``load/ours``, ``save/ours``: :class:`DistributedHFCheckpointer` with an FSDP2 model;
  ``load/ours`` is a load by a checkpointer that has loaded once (untimed, into another fresh
  model: what every load after a job's first costs, the part comparable with the floor, which
  knows the layout too); ``load/ours_first`` is a new checkpointer's first load, which also
  reads ``config.json`` and every header, checks the manifest and takes the output folder's
  lock; ``save/ours`` likewise is a
  save by a checkpointer that has saved before (untimed, in its preparation, its output
  then deleted like every operation's), and
  ``save/ours_first`` a new checkpointer's first save;
  ``save/ours_async``: the time an asynchronous save blocks the loop (its second save,
  once the staging buffers exist); the write and publish finish untimed before the check.
- ``load/torchtune``, ``save/torchtune``: torchtune 0.6.1 as its distributed recipes use it.
- ``load/ours_in_torchtune``, ``save/ours_rank0``: ours inside torchtune's own recipes (every
  rank loads full tensors; the LoRA recipe saves a gathered state dict on rank 0 only); the
  full recipe's save with ours is ``save/ours`` (every rank its shards, as ``CheckpointClient`` calls it).
- ``load/torch``, ``save/torch``: DCP's ``HuggingFaceStorageReader`` / consolidating
  ``HuggingFaceStorageWriter`` with a state dict of DTensors keyed by HF names.
- ``load/ours_tp``, ``save/ours_tp``: the same with tensor parallelism over every rank;
  ``load/ours_fsdp_tp``, ``save/ours_fsdp_tp``: FSDP2 over tensor parallel 2 (W >= 4). Each
  records the bytes the rank read or wrote (``moved``), which the report sets against W's share.
- ``stage/floor``: a plain copy of this rank's shards into buffers allocated beforehand (what
  ``save/ours_async`` must do before it returns; pinned host buffers for a model on a GPU),
  checked like a load.
- ``load/floor``, ``save/floor``: plain ``os.preadv`` of this rank's rows into its shards;
  ``safetensors.torch.save_file`` of this rank's shards into a file of its own
  (``save/floor_fsync``: the same, then fsync, as durable as ours). ``load/floor_populated``
  first populates each shard's pages in one call, as our reader does.

With ``--device cuda`` the models and shards live on the rank's GPU (the ``preadv`` floor reads
into host memory, then copies to the GPU).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from bench.models import MODEL_TYPE
from checkpointer import DistributedHFCheckpointer, ModelConfig
from checkpointer.format.folder import LocalFolder
from checkpointer.format.hf_files import read_checkpoint_files
from checkpointer.format.safetensors import TensorEntry
from checkpointer.format.tensor_io import populate_pages, tensor_bytes
from checkpointer.mapping.local_shards import dtensor_like
from checkpointer.train.fsdp import build_sharded_model, default_mesh, parallel_mesh

DTYPE = torch.bfloat16

Operation = Callable[[], Any]


def discard(ctx: Context, folder: Path) -> None:
    """Remove what an operation wrote, once every rank is done with it, and flush dirty pages.

    Every operation runs after this, whether its own preparation saved (untimed) or the
    operation before it fsynced its files or left them dirty: each starts with nothing to write
    back, and with the page cache the deleted files held free again. (On this VM memory freed a
    moment ago is several times faster to fill than memory the host has taken back.)
    """
    dist.barrier()
    if ctx.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.sync()
    dist.barrier()


def local_bytes(state_dict: dict[str, Any]) -> int:
    """Bytes of this rank's shards of ``state_dict``."""
    return sum(local_tensor(v).numel() * local_tensor(v).element_size() for v in state_dict.values())


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; a plain tensor itself."""
    return value.to_local() if isinstance(value, DTensor) else value


class Context:
    """What every method needs on one rank: the base model, the mesh, output folders."""

    def __init__(self, rank: int, world: int, base: Path, out: Path, device: str = "cpu"):
        self.rank, self.world, self.base, self.out, self.device = rank, world, base, out, device
        self.mesh = default_mesh(device)
        self.config = ModelConfig.from_json((base / "config.json").read_text())
        checkpoint = read_checkpoint_files(LocalFolder(base))
        self.weight_map: dict[str, str] = checkpoint.weight_map or {}
        self.files = sorted(checkpoint.files)
        self.entries: dict[str, TensorEntry] = checkpoint.tensors
        self.moved: int | None = None  # bytes the last tensor-parallel operation read or wrote on this rank
        self._parallel_models: dict[str, nn.Module] = {}

    def fresh_model(self) -> nn.Module:
        """An FSDP2-sharded torchtune model whose local shards are allocated, never touched."""
        return build_sharded_model(MODEL_TYPE, self.config, self.mesh, device=self.device, dtype=DTYPE)

    def fresh_hf_shards(self) -> dict[str, DTensor]:
        """DTensors keyed by HF names, sharded on dim 0 like FSDP2, with untouched local shards."""
        return {name: self._dtensor(entry.shape) for name, entry in self.entries.items()}

    def _dtensor(self, shape: tuple[int, ...]) -> DTensor:
        local_shape, _ = compute_local_shape_and_global_offset(shape, self.mesh, [Shard(0)])
        local = torch.empty(local_shape, dtype=DTYPE, device=self.device)
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=_strides(shape))

    def parallel_model(self, tp: int) -> nn.Module:
        """A model tensor-parallel over ``tp`` ranks and FSDP2-sharded over the rest, local shards untouched."""
        mesh = parallel_mesh(self.device, tensor_parallel_dim=tp)
        return build_sharded_model(MODEL_TYPE, self.config, mesh, device=self.device, dtype=DTYPE)

    def loaded_parallel_model(self, layout: str) -> nn.Module:
        """The model a tensor-parallel save method saves (loaded once per layout, by us)."""
        if layout not in self._parallel_models:
            model = self.parallel_model(PARALLEL_LAYOUTS[layout][0](self.world))
            DistributedHFCheckpointer(self.base, self.out, MODEL_TYPE).load_model(model)
            self._parallel_models[layout] = model
        return self._parallel_models[layout]

    @cached_property
    def loaded_model(self) -> nn.Module:
        """The model that save methods with torchtune keys save (loaded once, by us)."""
        model = self.fresh_model()
        DistributedHFCheckpointer(self.base, self.out, MODEL_TYPE).load_model(model)
        return model

    @cached_property
    def loaded_hf_shards(self) -> dict[str, DTensor]:
        """The HF-keyed DTensors that save methods with HF keys save (loaded once, by pread)."""
        shards = self.fresh_hf_shards()
        pread_shards(self.base, self.entries, shards)
        return shards

    @cached_property
    def file_numbers(self) -> dict[str, int]:
        """Tensor name -> the 1-based number of its file, as torchtune and torch's writer name files."""
        numbers = {file: i for i, file in enumerate(self.files, start=1)}
        return {name: numbers[file] for name, file in self.weight_map.items()}

    @cached_property
    def share(self) -> int:
        """Bytes of this rank's shards of the model."""
        return local_bytes(self.fresh_hf_shards())

    def out_dir(self, key: str, rep: int) -> Path:
        return self.out / key.replace("/", "-") / f"rep{rep}"


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def pread_shards(base: Path, entries: dict[str, TensorEntry], shards: dict[str, DTensor], populate: bool = False) -> None:
    """Read each shard's rows with plain ``os.preadv`` into its local tensor (through host memory for a GPU's).

    ``populate``: first fault in each shard's pages in one call, as our reader does.
    """
    fds = {file: os.open(base / file, os.O_RDONLY) for file in {e.file for e in entries.values()}}
    try:
        for name, value in shards.items():
            entry, local = entries[name], value.to_local()
            host = local if local.device.type == "cpu" else torch.empty_like(local, device="cpu")
            if populate:
                populate_pages(host)
            if local.numel():
                _preadv_all(fds[entry.file], tensor_bytes(host), entry.start + _first_row(value) * entry.row_bytes)
            if host is not local:
                local.copy_(host)
    finally:
        for fd in fds.values():
            os.close(fd)


def _first_row(value: DTensor) -> int:
    return compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)[1][0]


def _preadv_all(fd: int, out: memoryview, offset: int) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends at {offset + done}")
        done += n


# ---- the registry -----------------------------------------------------------------------

Prepare = Callable[[Context, int], Operation]


@dataclass(frozen=True)
class Method:
    """One way to load, save or stage: ``op`` is "load", "save" or "stage"; ``name`` is who does it."""

    op: str
    name: str
    description: str
    prepare: Prepare
    applies: Callable[[int, ModelConfig], bool] = lambda world, config: True  # whether it runs at W ranks on this model

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"


METHODS: dict[str, Method] = {}


def method(
    op: str, name: str, description: str, applies: Callable[[int, ModelConfig], bool] = lambda world, config: True
) -> Callable[[Prepare], Prepare]:
    """Register ``prepare`` as the method ``op/name`` (run where ``applies(world, config)``)."""

    def register(prepare: Prepare) -> Prepare:
        METHODS[f"{op}/{name}"] = Method(op, name, description, prepare, applies)
        return prepare

    return register


@method("load", "ours", "DistributedHFCheckpointer.load_model into the FSDP2 model by a checkpointer that has loaded once (a job's later loads)")
def load_ours(ctx: Context, rep: int) -> Operation:
    checkpointer = DistributedHFCheckpointer(ctx.base, ctx.out, MODEL_TYPE)
    checkpointer.load_model(ctx.fresh_model())  # once per job: config, headers, manifest check, output lock (into a model dropped here)
    model = ctx.fresh_model()

    def operation() -> nn.Module:
        checkpointer.load_model(model)
        return model

    return operation


@method("load", "ours_first", "the same by a new checkpointer: also reads config.json and every header, checks the manifest, takes the output lock")
def load_ours_first(ctx: Context, rep: int) -> Operation:
    model = ctx.fresh_model()

    def operation() -> nn.Module:
        DistributedHFCheckpointer(ctx.base, ctx.out, MODEL_TYPE).load_model(model)
        return model

    return operation


@method("load", "torchtune", "every rank FullModelHFCheckpointer.load_checkpoint + load_from_full_model_state_dict")
def load_torchtune(ctx: Context, rep: int) -> Operation:
    from torchtune.training import FullModelHFCheckpointer, load_from_full_model_state_dict

    model = ctx.fresh_model()
    out = ctx.out_dir("load/torchtune", rep)

    def operation() -> nn.Module:
        checkpointer = FullModelHFCheckpointer(str(ctx.base), ctx.files, MODEL_TYPE, str(out))
        full = checkpointer.load_checkpoint()["model"]
        load_from_full_model_state_dict(model, full, torch.device(ctx.device), strict=True)
        return model

    return operation


@method("load", "ours_in_torchtune", "as torchtune's recipes load with ours: every rank load_checkpoint + load_from_full_model_state_dict")
def load_ours_in_torchtune(ctx: Context, rep: int) -> Operation:
    from torchtune.training import load_from_full_model_state_dict

    model = ctx.fresh_model()

    def operation() -> nn.Module:
        full = DistributedHFCheckpointer(ctx.base, ctx.out, MODEL_TYPE).load_checkpoint()["model"]
        load_from_full_model_state_dict(model, full, torch.device(ctx.device), strict=True)
        return model

    return operation


@method("load", "torch", "dcp.load of HF-keyed DTensors with HuggingFaceStorageReader")
def load_torch(ctx: Context, rep: int) -> Operation:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shards = ctx.fresh_hf_shards()

    def operation() -> dict[str, Any]:
        dcp.load(shards, storage_reader=HuggingFaceStorageReader(str(ctx.base)))
        return shards

    return operation


def _load_floor(populate: bool) -> Prepare:
    """The preadv floor's load into fresh HF-ordered shards (``populate``: their pages populated first)."""

    def prepare(ctx: Context, rep: int) -> Operation:
        shards = ctx.fresh_hf_shards()

        def operation() -> dict[str, Any]:
            pread_shards(ctx.base, ctx.entries, shards, populate=populate)
            return shards

        return operation

    return prepare


load_floor = method("load", "floor", "os.preadv of this rank's rows into its shards")(_load_floor(populate=False))
load_floor_populated = method("load", "floor_populated", "the same, each shard's pages first populated in one madvise call (as ours does)")(
    _load_floor(populate=True)
)


@method("save", "ours", "DistributedHFCheckpointer.save_checkpoint of the FSDP2 model by a checkpointer that has saved once (a job's later saves)")
def save_ours(ctx: Context, rep: int) -> Operation:
    model, out = ctx.loaded_model, ctx.out_dir("save/ours", rep)
    checkpointer = DistributedHFCheckpointer(ctx.base, out, MODEL_TYPE)
    discard(ctx, Path(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)))  # once per job: open, probe, plan

    def operation() -> Path:
        return Path(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1))

    return operation


@method("save", "ours_first", "the same by a new checkpointer: also opens the base, probes which ranks share the output folder, plans the files")
def save_ours_first(ctx: Context, rep: int) -> Operation:
    model, out = ctx.loaded_model, ctx.out_dir("save/ours_first", rep)

    def operation() -> Path:
        checkpointer = DistributedHFCheckpointer(ctx.base, out, MODEL_TYPE)
        return Path(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0))

    return operation


PARALLEL_LAYOUTS: dict[str, tuple[Callable[[int], int], Callable[[int, ModelConfig], bool]]] = {
    # name: (tensor-parallel degree at W ranks, whether the layout exists at W for the model: heads split evenly)
    "tp": (lambda world: world, lambda world, config: world > 1 and config.num_key_value_heads % world == 0),
    "fsdp_tp": (lambda world: 2, lambda world, config: world >= 4 and world % 2 == 0 and config.num_key_value_heads % 2 == 0),
}


def _load_parallel(layout: str) -> Prepare:
    def prepare(ctx: Context, rep: int) -> Operation:
        model = ctx.parallel_model(PARALLEL_LAYOUTS[layout][0](ctx.world))

        def operation() -> nn.Module:
            checkpointer = DistributedHFCheckpointer(ctx.base, ctx.out, MODEL_TYPE)
            checkpointer.load_model(model)
            ctx.moved = checkpointer.last_load.bytes
            return model

        return operation

    return prepare


def _save_parallel(layout: str) -> Prepare:
    def prepare(ctx: Context, rep: int) -> Operation:
        model, out = ctx.loaded_parallel_model(layout), ctx.out_dir(f"save/ours_{layout}", rep)

        def operation() -> Path:
            checkpointer = DistributedHFCheckpointer(ctx.base, out, MODEL_TYPE)
            saved = Path(checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0))
            ctx.moved = checkpointer.last_save.bytes
            return saved

        return operation

    return prepare


for _layout, (_, _applies) in PARALLEL_LAYOUTS.items():
    _where = "tensor parallel over every rank" if _layout == "tp" else "FSDP2 over tensor parallel 2 (W >= 4)"
    method("load", f"ours_{_layout}", f"load_model into a model {_where}", _applies)(_load_parallel(_layout))
    method("save", f"ours_{_layout}", f"save_checkpoint of a model {_where}", _applies)(_save_parallel(_layout))


@dataclass(frozen=True)
class Unfinished:
    """What an operation returns when work it started goes on after it returns; ``finish`` (untimed) ends it."""

    finish: Callable[[], Any]


@method("save", "ours_async", "save_checkpoint(async_save=True): only the time the loop is blocked (copy into the staging buffers)")
def save_ours_async(ctx: Context, rep: int) -> Operation:
    model, out = ctx.loaded_model, ctx.out_dir("save/ours_async", rep)
    checkpointer = DistributedHFCheckpointer(ctx.base, out, MODEL_TYPE, async_save=True)
    first = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)  # a training loop's first save allocates the buffers
    checkpointer.wait()
    discard(ctx, Path(first))

    def operation() -> Unfinished:
        published = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=1)

        def finish() -> Path:
            checkpointer.wait()
            return Path(published)

        return Unfinished(finish)

    return operation


@method("stage", "floor", "torch copy_ of this rank's shards into reused buffers: the least a save that returns before writing can block")
def stage_floor(ctx: Context, rep: int) -> Operation:
    sources, pin = ctx.loaded_model.state_dict(), ctx.device != "cpu"
    buffers = {key: torch.empty(local_tensor(v).shape, dtype=v.dtype, pin_memory=pin) for key, v in sources.items()}
    staged = {key: dtensor_like(sources[key], buffer) if isinstance(sources[key], DTensor) else buffer for key, buffer in buffers.items()}  # the same memory, checked as shards

    def operation() -> dict[str, torch.Tensor]:
        for key, buffer in buffers.items():
            buffer.copy_(local_tensor(sources[key]), non_blocking=pin)
        if pin:
            torch.cuda.synchronize()
        return staged

    operation()  # touched once, as the async save's first save touches its buffers
    return operation


@method("save", "torchtune", "gather_cpu_state_dict + rank 0 FullModelHFCheckpointer.save_checkpoint")
def save_torchtune(ctx: Context, rep: int) -> Operation:
    from torchtune.training import gather_cpu_state_dict

    model, out = ctx.loaded_model, ctx.out_dir("save/torchtune", rep)
    checkpointer = torchtune_checkpointer(ctx, out) if ctx.rank == 0 else None

    def operation() -> Path:
        state_dict = gather_cpu_state_dict(model, ctx.rank == 0)
        if checkpointer is not None:
            checkpointer.save_checkpoint({"model": state_dict}, epoch=0)
        return out / "epoch_0"

    return operation


@method("save", "ours_rank0", "as torchtune's LoRA recipe saves with ours: gather_cpu_state_dict + rank 0 save_checkpoint alone")
def save_ours_rank0(ctx: Context, rep: int) -> Operation:
    from torchtune.training import gather_cpu_state_dict

    model, out = ctx.loaded_model, ctx.out_dir("save/ours_rank0", rep)
    checkpointer = DistributedHFCheckpointer(ctx.base, out, MODEL_TYPE)

    def operation() -> Path:
        state_dict = gather_cpu_state_dict(model, ctx.rank == 0)
        if ctx.rank == 0:
            checkpointer.save_checkpoint({"model": state_dict}, epoch=0)
        return out / "epoch_0"

    return operation


def torchtune_checkpointer(ctx: Context, out: Path) -> Any:
    """A FullModelHFCheckpointer as a recipe holds it at save time: its weight map known.

    ``load_checkpoint`` records which file (``"0001"``...) each HF key came from; the same
    map is set here from the index, without loading the whole model once more.
    """
    from torchtune.training import FullModelHFCheckpointer

    checkpointer = FullModelHFCheckpointer(str(ctx.base), ctx.files, MODEL_TYPE, str(out))
    checkpointer._weight_map = {name: f"{number:04}" for name, number in ctx.file_numbers.items()}
    return checkpointer


@method("save", "torch", "dcp.save with HuggingFaceStorageWriter(save_distributed, enable_consolidation)")
def save_torch(ctx: Context, rep: int) -> Operation:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    shards, out = ctx.loaded_hf_shards, ctx.out_dir("save/torch", rep)

    def operation() -> Path:
        writer = HuggingFaceStorageWriter(
            str(out), fqn_to_index_mapping=ctx.file_numbers, save_distributed=True, enable_consolidation=True
        )
        dcp.save(shards, storage_writer=writer)
        return out

    return operation


@method("save", "floor", "safetensors.torch.save_file of this rank's shards into its own file")
def save_floor(ctx: Context, rep: int) -> Operation:
    return _own_file(ctx, ctx.out_dir("save/floor", rep), fsync=False)


@method("save", "floor_fsync", "the same, then fsync of that file (the durability ours and torch's writer give)")
def save_floor_fsync(ctx: Context, rep: int) -> Operation:
    return _own_file(ctx, ctx.out_dir("save/floor_fsync", rep), fsync=True)


def _own_file(ctx: Context, out: Path, fsync: bool) -> Operation:
    """Each rank writes its HF-keyed shards with ``save_file`` into a file of its own."""
    from safetensors.torch import save_file

    shards, path = ctx.loaded_hf_shards, out / f"rank-{ctx.rank:05d}.safetensors"
    out.mkdir(parents=True, exist_ok=True)

    def operation() -> Path:
        save_file({name: value.to_local() for name, value in shards.items()}, str(path))
        if fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return out

    return operation
