"""The tiny model variants tests run over (one table), and how to get reference logits."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import torch

from checkpointer.testing.tiny_models import write_tiny_model

TOLERANCE = 1e-5  # fp32 logits of ours against transformers' (eager attention)
SMOLLM2_HEADS = {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3}
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 100000.0}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A tiny random checkpoint: its torchtune model type and what ``write_tiny_model`` gets."""

    name: str
    model_type: str
    tied: bool | None = None
    overrides: tuple[tuple[str, Any], ...] = ()  # config.json fields
    max_shard_size: str | None = None  # several files and an index when set
    fused_experts: bool = False  # MoE experts as one 3-D tensor each, as transformers holds them
    io: bool = True  # the load/save tests run over it too (the builder tests run over every variant)

    def write(self, root: pathlib.Path) -> pathlib.Path:
        return write_tiny_model(
            self.model_type, root / self.name, tied=self.tied, max_shard_size=self.max_shard_size, fused_experts=self.fused_experts,
            **dict(self.overrides),
        )  # fmt: skip


def _variant(
    name: str, model_type: str, *, tied: bool | None = None, max_shard_size: str | None = None, fused_experts: bool = False, io: bool = True,
    **overrides: Any,
) -> Variant:  # fmt: skip
    return Variant(name, model_type, tied, tuple(sorted(overrides.items())), max_shard_size, fused_experts, io)


ALL_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        _variant("llama3_2_tied_scaled", "LLAMA3_2", max_shard_size="20KB"),  # tied, llama3 rope scaling, 4 heads / 2 kv heads
        _variant("llama3_2_untied", "LLAMA3_2", tied=False, io=False),
        # SmolLM2-like: 9 heads / 3 kv heads (a shard boundary splits a head on 2 ranks), no scaling
        _variant("llama3_2_9_heads", "LLAMA3_2", **SMOLLM2_HEADS, rope_parameters=_DEFAULT_ROPE),
        _variant("llama3", "LLAMA3", max_shard_size="30KB"),  # untied, theta 500000
        _variant("llama2", "LLAMA2"),  # untied, MHA
        _variant("mistral", "MISTRAL", max_shard_size="25KB"),  # GQA
        _variant("qwen2_tied", "QWEN2"),  # tied, q/k/v biases
        _variant("qwen2_untied", "QWEN2", tied=False, max_shard_size="20KB"),
        _variant("qwen3", "QWEN3", max_shard_size="40KB"),  # head_dim 24 != 64 / 4
        _variant("qwen3_tied_9_heads", "QWEN3", tied=True, **SMOLLM2_HEADS, head_dim=16, io=False),
        _variant("qwen3_attention_bias", "QWEN3", attention_bias=True, io=False),
        _variant("gemma", "GEMMA"),  # MQA, head_dim 24
        _variant("gemma2", "GEMMA2", max_shard_size="30KB"),
        _variant("gemma2_sliding_window", "GEMMA2", sliding_window=8, io=False),  # shorter than the builder tests' 16 tokens
        _variant("phi3_mini", "PHI3_MINI", max_shard_size="30KB"),  # MHA, untied
        _variant("phi3_mini_tied_gqa", "PHI3_MINI", tied=True, num_key_value_heads=2, io=False),
        # 8 experts per layer (uneven over 3 ranks), top 2, one tensor per expert as save_pretrained writes them
        _variant("qwen3_moe", "QWEN3_MOE", max_shard_size="100KB"),  # norm_topk_prob
        _variant("qwen3_moe_no_topk_norm", "QWEN3_MOE", norm_topk_prob=False, io=False),
        _variant("mixtral", "MIXTRAL"),  # interleaved RoPE
        # fused 3-D experts (experts.gate_up_proj [E, 2F, D]), as transformers holds them
        _variant("qwen3_moe_fused", "QWEN3_MOE", fused_experts=True, max_shard_size="100KB"),
    ]
}
VARIANTS: dict[str, Variant] = {name: v for name, v in ALL_VARIANTS.items() if v.io}  # what load/save tests run over

TOKENS = torch.tensor([[1, 5, 9, 33, 7, 100, 64, 3, 12, 90, 41, 2], [1, 77, 21, 8, 8, 15, 99, 120, 4, 31, 60, 2]])


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
