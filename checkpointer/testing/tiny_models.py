"""Tiny random Hugging Face checkpoints, written with transformers, for tests and demos.

Each model type (torchtune's ``ModelType`` names) has a function in ``TINY_CONFIGS`` that
returns a transformers config with a few layers, hidden size 32-96 and a vocabulary of
``TINY_VOCAB_SIZE`` tokens. ``write_tiny_model`` builds the model from it with a fixed
seed and saves it with ``save_pretrained`` (safetensors, optionally sharded), next to a
small byte-level BPE tokenizer (one token per ASCII character) that
``AutoTokenizer.from_pretrained`` can load.

Default variants:

- LLAMA3_2: tied, Llama-3.1 RoPE scaling (factor 32, original context 64 < 256 positions,
  which rescales all but the fastest frequency at head_dim 16), 4 heads / 2 kv heads.
- LLAMA3: untied, plain RoPE with theta 500000, 4 heads / 2 kv heads.
- LLAMA2: untied, plain RoPE with theta 10000, 4 heads (MHA).
- MISTRAL: untied, 4 heads / 2 kv heads (GQA).
- QWEN2: tied (``tied=False`` for the untied variant), 4 heads / 2 kv heads, q/k/v biases.
- QWEN3: untied, head_dim 24 != hidden 64 / 4 heads, q/k RMSNorm.
- GEMMA: tied, head_dim 24 != hidden 64 / 4 heads, 1 kv head (MQA, like Gemma 2B).
- GEMMA2: tied, 4 heads / 2 kv heads, sliding window 32, query_pre_attn_scalar 24.
- PHI3_MINI: untied, no RoPE scaling, partial_rotary_factor 1.0, 4 heads (MHA).

SmolLM2-like odd heads: ``write_tiny_model("LLAMA3_2", p, hidden_size=72,
num_attention_heads=9, num_key_value_heads=3, rope_parameters={"rope_type": "default",
"rope_theta": 100000.0})``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

TINY_VOCAB_SIZE = 128
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Fields every tiny config shares; each model type adds or overrides a few.
_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    **_SPECIAL_IDS,
}


def _plain_rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


def _make(config_name: str, **fields: Any) -> Callable[..., Any]:
    """A function building transformers' ``config_name`` from the common fields, ``fields`` and overrides."""

    def build(**overrides: Any) -> Any:
        import transformers

        return getattr(transformers, config_name)(**(_COMMON | fields | overrides))

    build.__name__ = f"tiny_{config_name}"
    return build


TINY_CONFIGS: dict[str, Callable[..., Any]] = {
    "LLAMA3_2": _make(
        "LlamaConfig",
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "LLAMA3": _make("LlamaConfig", tie_word_embeddings=False, rope_parameters=_plain_rope(500_000.0)),
    "LLAMA2": _make(
        "LlamaConfig", tie_word_embeddings=False, num_key_value_heads=4, rope_parameters=_plain_rope(10_000.0)
    ),
    "MISTRAL": _make(
        "MistralConfig", tie_word_embeddings=False, sliding_window=256, rope_parameters=_plain_rope(10_000.0)
    ),
    "QWEN2": _make("Qwen2Config", tie_word_embeddings=True, rope_parameters=_plain_rope(1_000_000.0)),
    "QWEN3": _make(
        "Qwen3Config", tie_word_embeddings=False, head_dim=24, rope_parameters=_plain_rope(1_000_000.0)
    ),
    "GEMMA": _make(
        "GemmaConfig",
        tie_word_embeddings=True,
        head_dim=24,
        num_key_value_heads=1,
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        rope_parameters=_plain_rope(10_000.0),
    ),
    "GEMMA2": _make(
        "Gemma2Config",
        tie_word_embeddings=True,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=32,
        rms_norm_eps=1e-6,
        rope_parameters=_plain_rope(10_000.0),
    ),
    "PHI3_MINI": _make(
        "Phi3Config",
        tie_word_embeddings=False,
        num_key_value_heads=4,
        original_max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0},
    ),
    # 8 experts (uneven over 3 ranks), top 2; every weight perturbed (see ``_PERTURB_ALL``).
    "QWEN3_MOE": _make(
        "Qwen3MoeConfig",
        tie_word_embeddings=False,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        rope_parameters=_plain_rope(1_000_000.0),
    ),
    "MIXTRAL": _make(
        "MixtralConfig",
        tie_word_embeddings=False,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        rope_parameters=_plain_rope(1_000_000.0),
    ),
}
# Types whose every weight gets noise: transformers starts routers at zero or tiny values,
# and with near-uniform routing a wrong router or expert order would not show in the logits.
_PERTURB_ALL = frozenset({"QWEN3_MOE", "MIXTRAL"})


def tiny_config(model_type: str, *, tied: bool | None = None, **overrides: Any) -> Any:
    """The transformers config of the tiny ``model_type`` model, with ``overrides`` applied."""
    try:
        make = TINY_CONFIGS[model_type]
    except KeyError:
        raise ValueError(
            f"no tiny config for model type {model_type!r}; known: {sorted(TINY_CONFIGS)}"
        ) from None
    if tied is not None:
        overrides["tie_word_embeddings"] = tied
    return make(**overrides)


def write_tiny_model(
    model_type: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    tied: bool | None = None,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    fused_experts: bool = False,
    **overrides: Any,
) -> pathlib.Path:
    """Write a tiny random ``model_type`` checkpoint (config, weights, tokenizer) to ``path``.

    ``tied`` overrides ``tie_word_embeddings``; ``overrides`` set other config fields. With a
    small ``max_shard_size`` (e.g. ``"20KB"``) the weights are split over several files and a
    ``model.safetensors.index.json``. Norm scales and biases get random noise (see
    ``_perturb_constants``). ``fused_experts`` writes the tensors as transformers holds them
    (``save_original_format=False``: mixture-of-experts weights as fused 3-D tensors such as
    ``experts.gate_up_proj``) instead of one tensor per expert. Returns ``path``.
    """
    from transformers import AutoModelForCausalLM

    out = pathlib.Path(path)
    config = tiny_config(model_type, tied=tied, **overrides)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb_constants(model)
        if model_type in _PERTURB_ALL:
            _perturb_constants(model, dims=None)
    model = model.to(dtype).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if fused_experts:
        kwargs["save_original_format"] = False
    model.save_pretrained(out, **kwargs)
    write_tiny_tokenizer(out, config.vocab_size, TINY_CHAT_TEMPLATE)
    return out


@torch.no_grad()
def _perturb_constants(model: torch.nn.Module, scale: float = 0.2, dims: int | None = 1) -> None:
    """Add noise to 1-D parameters (norm scales, biases), which transformers initialises to constants.

    With constant norms a swapped or misplaced norm would not change the logits; with noise it does.
    ``dims=None`` perturbs every parameter.
    """
    for param in model.parameters():
        if dims is None or param.ndim == dims:
            param.add_(torch.randn_like(param), alpha=scale)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG inside a fork of it, so the caller's random state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_vocab(vocab_size: int) -> dict[str, int]:
    """Special tokens, printable ASCII in byte-level spelling, filler tokens: exactly ``vocab_size`` entries.

    Byte-level spelling is GPT-2's: bytes 33-126 stand for themselves and the space is ``"Ġ"``,
    so model-specific tokenizer classes that assume a byte-level BPE (e.g. Qwen2's) read it too.
    """
    if vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS)}, got {vocab_size}")
    chars = [chr(b) if b > 32 else chr(256 + b) for b in range(32, 127)]
    tokens = (list(SPECIAL_TOKENS.values()) + chars)[:vocab_size]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    return {tok: i for i, tok in enumerate(tokens)}


# A ChatML-like template over the tiny vocabulary (its special tokens <s> and </s>).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def write_tiny_tokenizer(
    path: str | os.PathLike[str], vocab_size: int = TINY_VOCAB_SIZE, chat_template: str | None = None
) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json``: a byte-level BPE built in code.

    One token per printable ASCII character, plus the special tokens (see ``tiny_vocab``);
    ``chat_template`` goes into ``tokenizer_config.json`` when given.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(vocab=tiny_vocab(vocab_size), merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(text, special=True) for text in SPECIAL_TOKENS.values()])
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "TokenizersBackend",  # transformers 5's name for a plain tokenizer.json
        "model_max_length": _COMMON["max_position_embeddings"],
        **{f"{role}_token": text for role, text in SPECIAL_TOKENS.items()},
        **({"chat_template": chat_template} if chat_template else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
