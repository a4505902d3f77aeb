"""The dimensions of a model, read from a Hugging Face ``config.json``.

transformers 5 writes ``rope_parameters`` and ``dtype`` where older releases wrote
``rope_theta``/``rope_scaling`` and ``torch_dtype``: both spellings are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from checkpointer.errors import CheckpointFormatError
from checkpointer.format.dtypes import CONFIG_DTYPES
from checkpointer.format.json_files import parse_json


@dataclass(frozen=True)
class ModelConfig:
    """What checkpointing and model building need to know of a Hugging Face config."""

    model_type: str
    vocab_size: int | None  # None when config.json does not say: converting keys needs only the head shapes
    hidden_size: int
    intermediate_size: int | None
    num_hidden_layers: int | None
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    dtype: torch.dtype | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    # Architecture details some model builders need; absent fields keep these defaults.
    attention_bias: bool | None = None  # None: the config does not say (Qwen2 then has q/k/v biases)
    mlp_bias: bool = False
    hidden_act: str | None = None  # ``hidden_activation`` (Gemma) or ``hidden_act``
    sliding_window: int | None = None  # None also when ``use_sliding_window`` is false
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    partial_rotary_factor: float = 1.0
    # Mixture of experts (Qwen3-MoE, Mixtral); num_experts 0 for dense models.
    num_experts: int = 0  # ``num_experts`` (Qwen) or ``num_local_experts`` (Mixtral)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # each expert's hidden size (Mixtral: intermediate_size)
    norm_topk_prob: bool | None = None  # renormalise the top-k routing weights (absent: the architecture decides)
    router_aux_loss_coef: float = 0.0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a config dict; ``source`` names the file in error messages."""
        try:
            heads = _count(raw, "num_attention_heads")
            hidden = _count(raw, "hidden_size")
            rope = _rope_parameters(raw)
            return cls(
                model_type=str(raw.get("model_type", "")),
                vocab_size=_optional_count(raw, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_optional_count(raw, "intermediate_size"),
                num_hidden_layers=_optional_count(raw, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=_count(raw, "num_key_value_heads", heads),
                head_dim=_count(raw, "head_dim", hidden // heads),
                rms_norm_eps=_positive(raw, "rms_norm_eps", 1e-6),
                max_position_embeddings=_count(raw, "max_position_embeddings", 2048),
                tie_word_embeddings=_flag(raw, "tie_word_embeddings"),
                rope_theta=_positive(rope, "rope_theta", 10_000.0),
                rope_scaling=_rope_scaling(rope),
                dtype=CONFIG_DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype"))),
                raw=raw,
                attention_bias=_optional(bool, raw.get("attention_bias")),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                hidden_act=_optional(str, raw.get("hidden_activation") or raw.get("hidden_act")),
                sliding_window=_sliding_window(raw),
                attn_logit_softcapping=_optional(float, raw.get("attn_logit_softcapping")),
                final_logit_softcapping=_optional(float, raw.get("final_logit_softcapping")),
                query_pre_attn_scalar=_optional(float, raw.get("query_pre_attn_scalar")),
                partial_rotary_factor=float(
                    rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
                ),
                **_moe_fields(raw),
            )
        except KeyError as e:
            raise CheckpointFormatError(f"{source}: required field {e.args[0]!r} is missing", file=source, key=e.args[0]) from None
        except _BadField as e:
            raise CheckpointFormatError(f"{source}: {e}", file=source, key=e.field) from None
        except (TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{source}: invalid value: {e}", file=source) from None

    def require(self, *names: str, purpose: str = "building the model") -> None:
        """Raise naming the first of ``names`` that config.json left out (fields only some uses need)."""
        for name in names:
            if getattr(self, name) is None:
                raise CheckpointFormatError(f"config.json: field {name!r} is missing; {purpose} needs it")

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "config.json") -> ModelConfig:
        """Parse the text of a ``config.json``."""
        raw = parse_json(text, source)
        if not isinstance(raw, dict):
            raise CheckpointFormatError(f"{source}: expected a JSON object, found {type(raw).__name__}", file=source)
        return cls.from_dict(raw, source)


def _moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of a config (none for a dense model)."""
    experts = raw.get("num_experts") or raw.get("num_local_experts")
    if not experts:
        return {}
    return {
        "num_experts": _count({"num_experts": experts}, "num_experts"),
        "num_experts_per_tok": _count(raw, "num_experts_per_tok"),
        "moe_intermediate_size": _count(raw, "moe_intermediate_size", _count(raw, "intermediate_size")),
        "norm_topk_prob": _optional(bool, raw.get("norm_topk_prob")),
        "router_aux_loss_coef": float(raw.get("router_aux_loss_coef") or 0.0),
        "decoder_sparse_step": _count(raw, "decoder_sparse_step", 1),
        "mlp_only_layers": tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
    }


class _BadField(ValueError):
    """A field of the config has a value of the wrong kind; the message names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _count(raw: dict[str, Any], name: str, default: int | None = None) -> int:
    """A dimension or count: a positive integer; ``default`` when absent or null (required without one)."""
    value = raw.get(name)
    if value is None:
        if default is None:
            raise KeyError(name)
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _BadField(name, f"{name} is {value!r}; it must be a positive integer")
    return value


def _optional_count(raw: dict[str, Any], name: str) -> int | None:
    return _count(raw, name) if raw.get(name) is not None else None


def _positive(raw: dict[str, Any], name: str, default: float) -> float:
    """A positive number (epsilon, RoPE base); ``default`` when absent or null."""
    value = raw.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _BadField(name, f"{name} is {value!r}; it must be a positive number")
    return float(value)


def _flag(raw: dict[str, Any], name: str) -> bool:
    """A true/false field, false when absent or null."""
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise _BadField(name, f"{name} is {value!r}; it must be true or false")
    return bool(value)


def _optional(kind: type, value: Any) -> Any:
    """``kind(value)``, or None when the field is absent or null."""
    return None if value is None else kind(value)


def _sliding_window(raw: dict[str, Any]) -> int | None:
    """The attention window, or None when there is none or ``use_sliding_window`` turns it off (Qwen)."""
    if raw.get("use_sliding_window") is False:
        return None
    return _optional(int, raw.get("sliding_window"))


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Merge the old (``rope_theta``, ``rope_scaling``) and new (``rope_parameters``) spellings."""
    merged: dict[str, Any] = {}
    if raw.get("rope_theta") is not None:
        merged["rope_theta"] = raw["rope_theta"]
    if isinstance(raw.get("rope_scaling"), dict):
        merged.update(raw["rope_scaling"])
    if isinstance(raw.get("rope_parameters"), dict):
        merged.update(raw["rope_parameters"])
    return merged


def _rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """The scaling part of the rope parameters, or None for plain RoPE."""
    kind = rope.get("rope_type") or rope.get("type")
    if kind in (None, "default"):
        return None
    return {k: v for k, v in rope.items() if k not in ("rope_theta", "type")} | {"rope_type": kind}
