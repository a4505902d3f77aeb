"""The tiny model variants every load/save test runs over, and how to get reference logits."""

from __future__ import annotations

import pathlib

import torch

from checkpointer.testing.tiny_models import write_tiny_model

# name -> (torchtune model type, write_tiny_model keyword arguments)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama3_2_tied_scaled": ("LLAMA3_2", {"max_shard_size": "20KB"}),
    # SmolLM2-like: 9 heads / 3 kv heads (a shard boundary splits a head on 2 ranks), no scaling
    "llama3_2_9_heads": (
        "LLAMA3_2",
        {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3,
         "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
    ),  # fmt: skip
    "llama3": ("LLAMA3", {"max_shard_size": "30KB"}),
    "llama2": ("LLAMA2", {}),
    "mistral": ("MISTRAL", {"max_shard_size": "25KB"}),
    "qwen2_tied": ("QWEN2", {}),
    "qwen2_untied": ("QWEN2", {"tied": False, "max_shard_size": "20KB"}),
    "qwen3": ("QWEN3", {"max_shard_size": "40KB"}),
    "gemma": ("GEMMA", {}),
    "gemma2": ("GEMMA2", {"max_shard_size": "30KB"}),
    "phi3_mini": ("PHI3_MINI", {"max_shard_size": "30KB"}),
    # 8 experts per layer (uneven over 3 ranks), one tensor per expert as save_pretrained writes them
    "qwen3_moe": ("QWEN3_MOE", {"max_shard_size": "100KB"}),
    "mixtral": ("MIXTRAL", {}),
    # fused 3-D experts (experts.gate_up_proj [E, 2F, D]), as transformers holds them
    "qwen3_moe_fused": ("QWEN3_MOE", {"fused_experts": True, "max_shard_size": "100KB"}),
}

TOKENS = torch.tensor([[1, 5, 9, 33, 7, 100, 64, 3, 12, 90, 41, 2], [1, 77, 21, 8, 8, 15, 99, 120, 4, 31, 60, 2]])


def write_variant(name: str, root: pathlib.Path) -> pathlib.Path:
    model_type, kwargs = VARIANTS[name]
    return write_tiny_model(model_type, root / name, **kwargs)


def hf_logits(path: str | pathlib.Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """Logits of the transformers model saved at ``path`` (fp32, eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def assert_same_tensors(base: str | pathlib.Path, saved: str | pathlib.Path) -> None:
    """Every tensor of the saved folder is bitwise the base's tensor of that name, and none is missing."""
    from safetensors.torch import load_file

    def tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    ours, theirs = tensors(pathlib.Path(saved)), tensors(pathlib.Path(base))
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())
    differ = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{saved}: {differ[:5]} differ from {base}"
