"""Random Llama-architecture base models in Hugging Face format, written once and reused.

The weights are random bf16 tensors written with ``safetensors`` into three shard files
plus ``model.safetensors.index.json``, like Hub models; ``config.json`` comes from
transformers' ``LlamaConfig``. No model object is ever built, so writing a 1B model
needs one shard's worth of memory.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpointer.format.file_layout import natural_key
from checkpointer.format.hf_files import INDEX_FILE

MODEL_TYPE = "LLAMA3"  # untied embeddings, plain RoPE (q/k rows are permuted for torchtune)
SHARD_FILES = 3  # the base is split into this many files, in name order, like save_pretrained


@dataclass(frozen=True)
class ModelSize:
    """The dimensions of one benchmark model (transformers ``LlamaConfig`` fields)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    def config_fields(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0},
        }


SIZES: dict[str, ModelSize] = {
    s.name: s
    for s in (
        ModelSize("1m", 2048, 128, 256, 2, 4, 2),  # smoke test
        ModelSize("20m", 8192, 512, 1408, 4, 8, 4),  # development
        ModelSize("300m", 32000, 1024, 2816, 20, 16, 8),  # 302M parameters, 0.60 GB
        ModelSize("1b", 32000, 2048, 5632, 18, 16, 8),  # 981M parameters, 1.96 GB
    )
}


def hf_shapes(size: ModelSize) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, as transformers' LlamaForCausalLM names them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**size.config_fields()))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _split(shapes: dict[str, tuple[int, ...]], files: int) -> list[list[str]]:
    """Names in natural order, cut greedily into ``files`` groups of about equal bytes."""
    names = sorted(shapes, key=natural_key)
    limit = sum(math.prod(s) for s in shapes.values()) / files
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        numel = math.prod(shapes[name])
        if groups[-1] and filled + numel > limit * 1.001 and len(groups) < files:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += numel
    return groups


def _random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Weights ~ N(0, 0.02); 1-D norm scales ~ 1 + N(0, 0.02); bf16."""
    values = torch.randn(shape, generator=generator) * 0.02
    return (values + 1 if len(shape) == 1 else values).to(torch.bfloat16)


def _write_shards(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, str]:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    groups = _split(shapes, SHARD_FILES)
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: _random_tensor(shapes[n], generator) for n in names}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    return weight_map


def _stamp(size: ModelSize, seed: int) -> str:
    return json.dumps({"size": size.__dict__, "seed": seed, "files": SHARD_FILES}, sort_keys=True)


def ensure_base_model(size: ModelSize, root: Path, seed: int = 0) -> Path:
    """The folder of ``size``'s base model under ``root``; written unless already complete."""
    from transformers import LlamaConfig

    path = root / f"base-{size.name}"
    stamp = path / ".complete"
    if stamp.exists() and stamp.read_text() == _stamp(size, seed):
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    LlamaConfig(**size.config_fields()).save_pretrained(path)
    shapes = hf_shapes(size)
    weight_map = _write_shards(path, shapes, seed)
    total = sum(math.prod(s) for s in shapes.values()) * torch.bfloat16.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    stamp.write_text(_stamp(size, seed))
    return path


def model_bytes(path: Path) -> int:
    """Bytes of weights in the base model at ``path`` (from its index)."""
    return int(json.loads((path / INDEX_FILE).read_text())["metadata"]["total_size"])
