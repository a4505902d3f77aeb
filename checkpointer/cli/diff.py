"""``checkpointer diff``: which tensors differ between two checkpoints, read one pair at a time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from checkpointer.cli.common import Checkpoint, Outcome, Timer
from checkpointer.format.dtypes import SAFETENSORS_NAMES
from checkpointer.format.file_layout import natural_key
from checkpointer.format.hf_files import CheckpointFiles
from checkpointer.format.safetensors import TensorEntry
from checkpointer.format.tensor_io import read_tensor
from checkpointer.runtime.progress import byte_bar


@dataclass(frozen=True)
class Difference:
    """One tensor that differs: how (missing, dtype, shape, values), both sides, and by how much."""

    name: str
    change: str  # "only in A", "only in B", "shape", "dtype", "values"
    a: str | None
    b: str | None
    max_abs: float | None = None
    rel_l2: float | None = None


def diff(a: str, b: str, atol: float, as_json: bool, storage_options: dict[str, Any] | None = None) -> Outcome:
    """Compare the tensors of ``a`` and ``b``; exit code 1 when any differs by more than ``atol``."""
    timer = Timer()
    left, right = Checkpoint.open(a, "A", storage_options), Checkpoint.open(b, "B", storage_options)
    files_a, files_b = left.tensor_files(), right.tensor_files()
    differences, compared = compare(files_a, files_b, atol)
    if as_json:
        print(json.dumps({"a": left.describe(), "b": right.describe(), "atol": atol, "compared": compared,
                          "differences": [asdict(d) for d in differences]}, indent=2))  # fmt: skip
    else:
        print("\n".join(_line(d) for d in differences) or f"no differences (atol {atol})")
    nbytes = files_a.total_bytes + files_b.total_bytes
    verdict = f"{len(differences)} of {len(set(files_a.tensors) | set(files_b.tensors))} tensors differ" if differences else "identical"
    return Outcome(1 if differences else 0, f"compared {compared} tensor pairs of {left.describe()} and {right.describe()}: {verdict}; {timer.rate(nbytes)}")


def compare(a: CheckpointFiles, b: CheckpointFiles, atol: float) -> tuple[list[Difference], int]:
    """The differences, by tensor name, and how many pairs were compared value by value."""
    names = sorted(set(a.tensors) | set(b.tensors), key=natural_key)
    both = [n for n in names if n in a.tensors and n in b.tensors and a.tensors[n].shape == b.tensors[n].shape]
    pair_bytes = {n: a.tensors[n].nbytes + b.tensors[n].nbytes for n in both}  # compared value by value
    differences = []
    with byte_bar(sum(pair_bytes.values()), "diff") as bar:
        for name in names:
            ea, eb = a.tensors.get(name), b.tensors.get(name)
            found = _compare(name, ea, eb, a, b, atol) if name in pair_bytes else _structural(name, ea, eb)
            differences += [found] if found else []
            bar.update(pair_bytes.get(name, 0))
    return differences, len(pair_bytes)


def _describe(entry: TensorEntry | None) -> str | None:
    return f"{SAFETENSORS_NAMES[entry.dtype]} {list(entry.shape)}" if entry else None


def _structural(name: str, a: TensorEntry | None, b: TensorEntry | None) -> Difference:
    change = "only in A" if b is None else "only in B" if a is None else "shape"
    return Difference(name, change, _describe(a), _describe(b))


def _compare(name: str, ea: TensorEntry, eb: TensorEntry, a: CheckpointFiles, b: CheckpointFiles, atol: float) -> Difference | None:
    ta, tb = read_tensor(a.folder, ea), read_tensor(b.folder, eb)
    max_abs, rel_l2 = _distance(ta, tb)
    if ea.dtype == eb.dtype and max_abs <= atol:
        return None
    return Difference(name, "dtype" if ea.dtype != eb.dtype else "values", _describe(ea), _describe(eb), max_abs, rel_l2)


def _distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max absolute difference and ``|a - b| / |a|`` (L2), computed in fp64 for integers, fp32 otherwise."""
    kind = torch.float32 if a.is_floating_point() and b.is_floating_point() else torch.float64
    a, b = a.to(kind), b.to(kind)
    if a.numel() == 0:
        return 0.0, 0.0
    delta = a - b
    norm = torch.linalg.vector_norm(a).item()
    change = torch.linalg.vector_norm(delta).item()
    return delta.abs().max().item(), change / norm if norm else (0.0 if change == 0 else float("inf"))


def _line(d: Difference) -> str:
    if d.change in ("only in A", "only in B", "shape"):
        return f"{d.change:<9}  {d.name}  A: {d.a or '-'}  B: {d.b or '-'}"
    return f"{d.change:<9}  {d.name}  A: {d.a}  B: {d.b}  max |a-b| {d.max_abs:.3g}  rel L2 {d.rel_l2:.3g}"
