"""Run torchtune 0.6.1's own recipe files, unmodified, from the installed wheel, on CPU.

    python tests/stock_recipes.py full_finetune_single_device --config <yaml> key=value ...
    python -m torch.distributed.run --nproc_per_node 2 tests/stock_recipes.py full_finetune_distributed --config ...

The recipes call a few CUDA-only functions that have nothing to do with checkpoints; this
wrapper shims exactly those (:func:`shim_cuda_only_calls`) and then runs the recipe file
with ``runpy.run_path`` as ``__main__``. Nothing in the library is shimmed.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

RECIPES = ("full_finetune_distributed", "lora_finetune_distributed", "full_finetune_single_device", "lora_finetune_single_device")


def wheel_root() -> Path:
    """``<site-packages>/recipes``: torchtune's recipe files and configs (its ``__init__`` raises, so no import)."""
    import torchtune

    return Path(torchtune.__file__).resolve().parent.parent / "recipes"


def recipe_file(name: str) -> Path:
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; one of {RECIPES}")
    return wheel_root() / f"{name}.py"


def stock_config(name: str) -> Path:
    """A config shipped in the wheel, e.g. ``llama3_2/1B_full.yaml``."""
    return wheel_root() / "configs" / name


def _cpu_memory_stats(device: torch.device, reset_stats: bool = True) -> dict[str, float]:
    return {"peak_memory_active": 0.0, "peak_memory_alloc": 0.0, "peak_memory_reserved": 0.0}


def shim_cuda_only_calls() -> None:
    """The CPU stand-ins: ``torch.cpu.empty_cache``/``reset_peak_memory_stats`` (missing),
    ``training.get_memory_stats`` (refuses CPU), and the LoRA recipe's ``"cuda:nccl,cpu:gloo"``."""
    from torchtune import training

    for name in ("empty_cache", "reset_peak_memory_stats"):
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda *args, **kwargs: None)
    training.get_memory_stats = _cpu_memory_stats
    init = dist.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        if backend == "cuda:nccl,cpu:gloo" and not torch.cuda.is_available():
            backend = "gloo"
        return init(backend, *args, **kwargs)

    dist.init_process_group = init_process_group


def main(argv: list[str]) -> None:
    """Run the recipe; a finished run then leaves with ``os._exit`` (not part of the recipe's behaviour):
    gloo's worker threads can abort interpreter finalization after ``destroy_process_group``
    ("terminate called without an active exception", pytorch/pytorch#179291), failing a run that finished."""
    path = recipe_file(argv[0])
    shim_cuda_only_calls()
    sys.argv = [str(path), *argv[1:]]
    try:
        runpy.run_path(str(path), run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
