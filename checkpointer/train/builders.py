"""Build a torchtune ``TransformerDecoder`` from a Hugging Face config, by torchtune model type name.

``build_model(model_type, config)`` looks ``model_type`` (torchtune's ``ModelType`` names) up in
``REGISTRY`` and builds the model with the config's dimensions; ``lora=LoraSpec(...)`` swaps in
``LoRALinear`` where asked. Everything can be built under ``torch.device("meta")``: after
``to_empty``, call ``reset_rope_buffers(model)`` to recompute the RoPE caches.

How each type is built, and the torchtune state-dict keys it has (``{i}`` is the layer;
with LoRA, each adapted ``X.weight`` also gets ``X.lora_a.weight`` and ``X.lora_b.weight``):

- LLAMA2, LLAMA3, LLAMA3_2, MISTRAL: a generic decoder from torchtune modules, with
  torchtune's interleaved ``RotaryPositionalEmbeddings`` (so q/k rows are permuted within each
  head, as ``convert_weights.hf_to_tune`` does) or ``Llama3ScaledRoPE`` for
  ``rope_type == "llama3"``. Keys: ``tok_embeddings.weight``,
  ``layers.{i}.attn.{q,k,v,output}_proj.weight``, ``layers.{i}.sa_norm.scale``,
  ``layers.{i}.mlp_norm.scale``, ``layers.{i}.mlp.{w1,w2,w3}.weight``, ``norm.scale`` and,
  when embeddings are not tied, ``output.weight``.
- QWEN2: the same, with ``Qwen2RotaryPositionalEmbeddings`` (HF's rotate-half, no permutation)
  and ``layers.{i}.attn.{q,k,v}_proj.bias`` (on unless ``attention_bias`` is false).
- QWEN3: the same as QWEN2 without biases (unless ``attention_bias``; then ``output_proj`` has
  one too), ``head_dim`` from the config, and ``layers.{i}.attn.{q,k}_norm.scale``: per-head
  RMSNorms applied *before* RoPE, as transformers does (torchtune 0.6.1's
  ``MultiHeadAttention`` applies them after; see ``QkNormBeforeRopeAttention``).
- GEMMA: torchtune's ``gemma``/``lora_gemma`` component builders (interleaved RoPE: q/k rows
  permuted as by ``hf_to_tune``). Keys as LLAMA, always tied (no ``output.weight``);
  ``GemmaRMSNorm`` multiplies by ``1 + scale`` as HF does by ``1 + weight``, so values carry
  over unchanged.
- GEMMA2: torchtune's ``gemma2``/``lora_gemma2`` (interleaved RoPE, attention soft-cap,
  sliding window on even layers, ``query_pre_attn_scalar``, falling back to ``head_dim`` when
  absent). Keys: ``tok_embeddings.weight``, ``layers.{i}.attn.{q,k,v,output}_proj.weight``,
  ``layers.{i}.sa_norm.scale``, ``layers.{i}.sa_scale.scale``, ``layers.{i}.mlp_norm.scale``,
  ``layers.{i}.mlp_scale.scale``, ``layers.{i}.mlp.{w1,w2,w3}.weight``,
  ``norm.rms_norm.scale``; always tied. In torchtune's layer ``sa_scale`` is HF's
  ``post_attention_layernorm``, ``mlp_norm`` the pre-MLP norm (HF
  ``pre_feedforward_layernorm``) and ``mlp_scale`` the post-MLP norm (HF
  ``post_feedforward_layernorm``); torchtune 0.6.1's ``gemma2_hf_to_tune`` swaps the last two
  (pytorch/torchtune#2850), so do not copy its map. torchtune 0.6.1 also soft-caps the final
  *hidden state* where transformers soft-caps the *logits*: this builder moves the cap onto
  the output projection (same keys; ``model.output`` is still a ``TiedLinear``).
- PHI3_MINI: torchtune's ``phi3``/``lora_phi3`` (rotate-half RoPE, no permutation). Keys as
  LLAMA, with ``output.weight`` unless the config ties embeddings; HF's fused
  ``qkv_proj``/``gate_up_proj`` split into ``{q,k,v}_proj`` and ``w1``/``w3``.

- QWEN3_MOE: QWEN3's attention; every layer's ``mlp`` is a ``MoEFeedForward`` (``moe.py``):
  ``layers.{i}.mlp.router.weight`` ``[E, D]`` (HF ``mlp.gate.weight``) and the stacked experts
  ``layers.{i}.mlp.experts.{gate,up}_proj`` ``[E, F, D]`` and ``...down_proj`` ``[E, D, F]``
  (HF ``mlp.experts.{e}.{gate,up,down}_proj.weight``, or fused ``mlp.experts.gate_up_proj``
  ``[E, 2F, D]`` and ``mlp.experts.down_proj``). ``F`` is ``moe_intermediate_size``; top-k
  weights renormalised when ``norm_topk_prob``. Dense layers between MoE layers
  (``decoder_sparse_step``, ``mlp_only_layers``) and LoRA on experts are refused.
- MIXTRAL: MISTRAL's attention (interleaved RoPE: q/k rows permuted) and the same MoE keys
  (HF ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.{e}.w1/w3/w2``; ``F`` is
  ``intermediate_size``); top-k weights always renormalised.

Sliding-window attention is not implemented for LLAMA*/MISTRAL/QWEN* (nor in torchtune): they
are exact only for sequences no longer than the window, and building with a longer
``max_seq_len`` warns. Configs a builder cannot honour (another RoPE scaling, partial rotary,
other activations, biases the key layout has no room for) raise ``CheckpointArgumentError`` (a
``ValueError``) naming the field.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchtune.models.gemma._component_builders import gemma, lora_gemma
from torchtune.models.gemma2._component_builders import gemma2, lora_gemma2
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.phi3._component_builders import lora_phi3, phi3
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.peft import LoRALinear

from checkpointer.errors import CheckpointArgumentError
from checkpointer.format.model_config import ModelConfig
from checkpointer.train.moe import MoEFeedForward

MAX_SEQ_LEN_CAP = 4096  # default max_seq_len: the config's max_position_embeddings, at most this
LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


@dataclass(frozen=True)
class LoraSpec:
    """torchtune's LoRA knobs: which linear layers get an adapter, and its rank, alpha and dropout."""

    lora_attn_modules: tuple[str, ...]
    apply_lora_to_mlp: bool = False
    apply_lora_to_output: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.lora_attn_modules) - set(LORA_ATTN_MODULES)
        if unknown:
            raise CheckpointArgumentError(f"unknown lora_attn_modules {sorted(unknown)}; choose from {LORA_ATTN_MODULES}", key="lora_attn_modules")
        object.__setattr__(self, "lora_attn_modules", tuple(self.lora_attn_modules))


Builder = Callable[[ModelConfig, int, LoraSpec | None], TransformerDecoder]


def build_model(
    model_type: str,
    config: ModelConfig,
    *,
    max_seq_len: int | None = None,
    lora: LoraSpec | None = None,
) -> TransformerDecoder:
    """Build the torchtune model of ``model_type`` (a ``ModelType`` name) with ``config``'s dimensions.

    ``max_seq_len`` (the RoPE cache length) defaults to ``max_position_embeddings`` capped at
    ``MAX_SEQ_LEN_CAP``. Raises CheckpointArgumentError (a ValueError) for an unknown model type or an unsupported config.
    """
    name = str(getattr(model_type, "name", model_type)).upper()  # also ModelType members, "llama3"
    try:
        builder = REGISTRY[name]
    except KeyError:
        raise CheckpointArgumentError(f"unknown model type {name!r}; supported: {', '.join(REGISTRY)}", key="model_type") from None
    config.require("vocab_size", "intermediate_size", "num_hidden_layers", purpose=f"building a {name} model")
    if max_seq_len is None:
        max_seq_len = min(config.max_position_embeddings, MAX_SEQ_LEN_CAP)
    return builder(config, max_seq_len, lora)


def build_model_from_dir(
    model_type: str, checkpoint_dir: str | os.PathLike[str], **kwargs: Any
) -> TransformerDecoder:
    """``build_model`` with the ``config.json`` of a local checkpoint folder; ``kwargs`` as there."""
    path = os.path.join(checkpoint_dir, "config.json")
    with open(path, "rb") as f:
        config = ModelConfig.from_json(f.read(), source=path)
    return build_model(model_type, config, **kwargs)


def reset_rope_buffers(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Recompute the RoPE caches of every module that has ``rope_init`` (after ``to_empty``).

    Buffers are built on ``device``, by default the device of the model's parameters. Returns
    how many modules were reset.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    modules = [m for m in model.modules() if callable(getattr(m, "rope_init", None))]
    with torch.device(device):
        for module in modules:
            module.rope_init()
    return len(modules)


def _model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer that is not on meta, else the CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Config checks


def _reject(model_type: str, problems: dict[str, bool]) -> None:
    """Raise ValueError listing every description in ``problems`` whose flag is True."""
    bad = [what for what, is_bad in problems.items() if is_bad]
    if bad:
        raise CheckpointArgumentError(f"{model_type}: config not supported by this builder: {'; '.join(bad)}", key="config")


def _rope_type(config: ModelConfig) -> str | None:
    return None if config.rope_scaling is None else config.rope_scaling.get("rope_type")


def _check_rope(model_type: str, config: ModelConfig, supported: Iterable[str | None]) -> str | None:
    """The config's rope_type (None for plain RoPE); ValueError naming it when not in ``supported``."""
    kind, supported = _rope_type(config), tuple(supported)
    if kind not in supported:
        names = ", ".join("none" if k is None else repr(k) for k in supported)
        raise CheckpointArgumentError(f"{model_type}: rope_type {kind!r} is not supported (supported: {names})", key="rope_type")
    _reject(
        model_type,
        {f"partial_rotary_factor {config.partial_rotary_factor} != 1": config.partial_rotary_factor != 1},
    )
    return kind


def _check_act(model_type: str, config: ModelConfig, allowed: tuple[str, ...]) -> None:
    act = config.hidden_act
    _reject(
        model_type,
        {f"hidden activation {act!r} (supported: {', '.join(allowed)})": act not in (None, *allowed)},
    )


# ---------------------------------------------------------------------------------------------
# Generic decoder (LLAMA*, MISTRAL, QWEN*)


@dataclass(frozen=True)
class _Arch:
    """What differs between the model types the generic decoder builds."""

    rope: Callable[[ModelConfig, int], nn.Module]
    qkv_bias: bool = False
    output_bias: bool = False
    qk_norm: bool = False
    moe: bool = False  # the feed-forward is a mixture of experts (``MoEFeedForward``)
    norm_topk_prob: bool | None = None  # None: the config's ``norm_topk_prob`` (absent: false)


class QkNormBeforeRopeAttention(MultiHeadAttention):
    """``MultiHeadAttention`` that applies ``q_norm``/``k_norm`` per head *before* RoPE (Qwen3).

    torchtune 0.6.1's ``MultiHeadAttention`` normalises after RoPE; the two agree only while
    the norm scales are equal within each rotated pair, i.e. not for trained weights.
    """

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: Any = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, s_x, _ = x.shape
        q = self._heads(self.q_proj(x), self.q_norm, input_pos)
        if y is None:
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        else:
            k = self._heads(self.k_proj(y), self.k_norm, input_pos)
            v = self.v_proj(y).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)
        if self.num_heads != self.num_kv_heads:
            k, v = (t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1) for t in (k, v))
        out = self._attention_call(
            q,
            k,
            v,
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.kv_cache is None and mask is None and self.is_causal,
        )
        return self.output_proj(out.transpose(1, 2).reshape(b, s_x, -1))

    def _heads(self, t: torch.Tensor, norm: nn.Module | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        """[b, s, n * h_d] -> [b, n, s, h_d], normalised per head, then rotated."""
        t = t.unflatten(-1, (-1, self.head_dim))
        if norm is not None:
            t = norm(t)
        if self.pos_embeddings is not None:
            t = self.pos_embeddings(t, input_pos=input_pos)
        return t.transpose(1, 2)


def _linear(in_dim: int, out_dim: int, lora: LoraSpec | None, *, bias: bool = False) -> nn.Module:
    """``LoRALinear`` when ``lora`` is given, else ``nn.Linear``; both keep ``weight``/``bias`` keys."""
    if lora is None:
        return nn.Linear(in_dim, out_dim, bias=bias)
    return LoRALinear(
        in_dim, out_dim, rank=lora.lora_rank, alpha=lora.lora_alpha, dropout=lora.lora_dropout, use_bias=bias
    )


def _attention(
    config: ModelConfig, max_seq_len: int, lora: LoraSpec | None, rope: nn.Module, arch: _Arch
) -> MultiHeadAttention:
    dim, head_dim = config.hidden_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    adapted = set(lora.lora_attn_modules) if lora else set()

    def proj(name: str, in_dim: int, out_dim: int, bias: bool) -> nn.Module:
        return _linear(in_dim, out_dim, lora if name in adapted else None, bias=bias)

    norms = (
        {
            "q_norm": RMSNorm(head_dim, eps=config.rms_norm_eps),
            "k_norm": RMSNorm(head_dim, eps=config.rms_norm_eps),
        }
        if arch.qk_norm
        else {}
    )
    attention_class = QkNormBeforeRopeAttention if arch.qk_norm else MultiHeadAttention
    return attention_class(
        embed_dim=dim,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        q_proj=proj("q_proj", dim, heads * head_dim, arch.qkv_bias),
        k_proj=proj("k_proj", dim, kv_heads * head_dim, arch.qkv_bias),
        v_proj=proj("v_proj", dim, kv_heads * head_dim, arch.qkv_bias),
        output_proj=proj("output_proj", heads * head_dim, dim, arch.output_bias),
        pos_embeddings=rope,
        max_seq_len=max_seq_len,
        **norms,
    )


def _mlp(config: ModelConfig, lora: LoraSpec | None) -> FeedForward:
    adapter = lora if lora is not None and lora.apply_lora_to_mlp else None
    dim, hidden = config.hidden_size, config.intermediate_size
    return FeedForward(
        gate_proj=_linear(dim, hidden, adapter),
        down_proj=_linear(hidden, dim, adapter),
        up_proj=_linear(dim, hidden, adapter),
    )


def _moe(model_type: str, config: ModelConfig, lora: LoraSpec | None, arch: _Arch) -> MoEFeedForward:
    """The mixture-of-experts feed-forward of every layer (LoRA is for attention only)."""
    _reject(
        model_type,
        {
            "apply_lora_to_mlp (LoRA on experts)": lora is not None and lora.apply_lora_to_mlp,
            f"decoder_sparse_step {config.decoder_sparse_step} (dense layers between MoE layers)": config.decoder_sparse_step != 1,
            f"mlp_only_layers {list(config.mlp_only_layers)}": bool(config.mlp_only_layers),
            "num_experts 0": not config.num_experts,
            f"num_experts_per_tok {config.num_experts_per_tok} (1 to num_experts)": not 0 < config.num_experts_per_tok <= config.num_experts,
        },
    )
    norm = arch.norm_topk_prob if arch.norm_topk_prob is not None else bool(config.norm_topk_prob)
    return MoEFeedForward(
        config.hidden_size, config.moe_intermediate_size or config.intermediate_size, config.num_experts, config.num_experts_per_tok, norm
    )


def _output(
    model_type: str, config: ModelConfig, tok_embeddings: nn.Embedding, lora: LoraSpec | None
) -> nn.Module | TiedLinear:
    """``TiedLinear`` over the embeddings when the config ties them, else a (LoRA) ``output`` linear."""
    adapt = lora is not None and lora.apply_lora_to_output
    if config.tie_word_embeddings:
        _reject(model_type, {"apply_lora_to_output with tied word embeddings": adapt})
        return TiedLinear(tok_embeddings)
    return _linear(config.hidden_size, config.vocab_size, lora if adapt else None)


def _warn_sliding_window(model_type: str, config: ModelConfig, max_seq_len: int) -> None:
    window = config.sliding_window
    if window is not None and max_seq_len > window:
        warnings.warn(
            f"{model_type}: sliding-window attention (window {window}) is not implemented; sequences "
            f"longer than the window (max_seq_len {max_seq_len}) attend to all earlier tokens",
            stacklevel=5,  # the caller of build_model
        )


def _decoder(
    model_type: str, config: ModelConfig, max_seq_len: int, lora: LoraSpec | None, arch: _Arch
) -> TransformerDecoder:
    """The generic pre-norm decoder: RMSNorm, (LoRA) attention with ``arch``'s RoPE, SwiGLU MLP."""
    _check_act(model_type, config, ("silu",))
    _reject(model_type, {"mlp_bias": config.mlp_bias})
    _warn_sliding_window(model_type, config, max_seq_len)
    rope = arch.rope(config, max_seq_len)
    eps = config.rms_norm_eps
    layers = nn.ModuleList(
        TransformerSelfAttentionLayer(
            attn=_attention(config, max_seq_len, lora, rope, arch),
            mlp=_moe(model_type, config, lora, arch) if arch.moe else _mlp(config, lora),
            sa_norm=RMSNorm(config.hidden_size, eps=eps),
            mlp_norm=RMSNorm(config.hidden_size, eps=eps),
        )
        for _ in range(config.num_hidden_layers)
    )
    tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        norm=RMSNorm(config.hidden_size, eps=eps),
        output=_output(model_type, config, tok_embeddings, lora),
    )


def _plain_rope(config: ModelConfig, max_seq_len: int) -> nn.Module:
    return RotaryPositionalEmbeddings(config.head_dim, max_seq_len=max_seq_len, base=config.rope_theta)


def _llama3_rope(config: ModelConfig, max_seq_len: int) -> nn.Module:
    scaling = config.rope_scaling or {}
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if scaling.get(f) is None]
    if missing:
        raise CheckpointArgumentError(f"rope_type 'llama3' needs {', '.join(missing)} in the rope parameters", key="rope_scaling")
    return Llama3ScaledRoPE(
        config.head_dim,
        max_seq_len=max_seq_len,
        base=config.rope_theta,
        scale_factor=scaling["factor"],
        low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        old_context_len=scaling["original_max_position_embeddings"],
    )


def _qwen_rope(config: ModelConfig, max_seq_len: int) -> nn.Module:
    return Qwen2RotaryPositionalEmbeddings(config.head_dim, max_seq_len=max_seq_len, base=config.rope_theta)


_LLAMA_ROPES: dict[str | None, Callable[[ModelConfig, int], nn.Module]] = {
    None: _plain_rope,
    "llama3": _llama3_rope,
}


def _llama(model_type: str) -> Builder:
    """LLAMA2/LLAMA3/LLAMA3_2/MISTRAL: interleaved RoPE (Llama-3.1 scaled when the config says so)."""

    def build(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
        kind = _check_rope(model_type, config, _LLAMA_ROPES)
        _reject(model_type, {"attention_bias": bool(config.attention_bias)})
        return _decoder(model_type, config, max_seq_len, lora, _Arch(rope=_LLAMA_ROPES[kind]))

    return build


def _qwen2(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
    """QWEN2: HF-style RoPE, q/k/v biases unless ``attention_bias`` is false."""
    _check_rope("QWEN2", config, (None,))
    bias = config.attention_bias is not False
    return _decoder("QWEN2", config, max_seq_len, lora, _Arch(rope=_qwen_rope, qkv_bias=bias))


def _qwen3(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
    """QWEN3: HF-style RoPE, per-head q/k RMSNorm before RoPE, biases only with ``attention_bias``."""
    _check_rope("QWEN3", config, (None,))
    bias = bool(config.attention_bias)
    return _decoder(
        "QWEN3",
        config,
        max_seq_len,
        lora,
        _Arch(rope=_qwen_rope, qkv_bias=bias, output_bias=bias, qk_norm=True),
    )


def _qwen3_moe(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
    """QWEN3_MOE: QWEN3's attention with a mixture-of-experts feed-forward in every layer."""
    _check_rope("QWEN3_MOE", config, (None,))
    bias = bool(config.attention_bias)
    arch = _Arch(rope=_qwen_rope, qkv_bias=bias, output_bias=bias, qk_norm=True, moe=True)
    return _decoder("QWEN3_MOE", config, max_seq_len, lora, arch)


def _mixtral(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
    """MIXTRAL: Mistral's attention (interleaved RoPE) with experts; top-k weights always renormalised."""
    _check_rope("MIXTRAL", config, (None,))
    _reject("MIXTRAL", {"attention_bias": bool(config.attention_bias)})
    return _decoder("MIXTRAL", config, max_seq_len, lora, _Arch(rope=_plain_rope, moe=True, norm_topk_prob=True))


# ---------------------------------------------------------------------------------------------
# torchtune's own component builders (GEMMA, GEMMA2, PHI3_MINI)


def _torchtune(
    base: Callable[..., TransformerDecoder],
    with_lora: Callable[..., TransformerDecoder],
    lora: LoraSpec | None,
    **dims: Any,
) -> TransformerDecoder:
    """Call torchtune's component builder ``base``, or its LoRA variant with ``lora``'s knobs."""
    if lora is None:
        return base(**dims)
    extra = {"apply_lora_to_output": lora.apply_lora_to_output} if lora.apply_lora_to_output else {}
    return with_lora(
        lora_attn_modules=list(lora.lora_attn_modules),
        apply_lora_to_mlp=lora.apply_lora_to_mlp,
        lora_rank=lora.lora_rank,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        **extra,
        **dims,
    )


def _common_dims(config: ModelConfig, max_seq_len: int) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "embed_dim": config.hidden_size,
        "intermediate_dim": config.intermediate_size,
        "max_seq_len": max_seq_len,
        "norm_eps": config.rms_norm_eps,
        "rope_base": config.rope_theta,
    }


# torchtune's Gemma MLP is GELU(tanh); "gelu" is in Gemma's first configs, which transformers 4
# ran as GELU(tanh).
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")


def _check_gemma(model_type: str, config: ModelConfig, lora: LoraSpec | None) -> None:
    _check_rope(model_type, config, (None,))
    _check_act(model_type, config, _GELU_TANH)
    _reject(
        model_type,
        {
            "untied word embeddings": not config.tie_word_embeddings,
            "apply_lora_to_output with tied word embeddings": lora is not None and lora.apply_lora_to_output,
            "attention_bias": bool(config.attention_bias),
        },
    )


def _gemma(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
    """GEMMA: torchtune's ``gemma``/``lora_gemma``."""
    _check_gemma("GEMMA", config, lora)
    return _torchtune(gemma, lora_gemma, lora, head_dim=config.head_dim, **_common_dims(config, max_seq_len))


class SoftcappedTiedLinear(TiedLinear):
    """A ``TiedLinear`` whose logits are soft-capped, ``cap * tanh(logits / cap)``, as in HF Gemma2."""

    def __init__(self, tied_module: nn.Module, cap: float) -> None:
        super().__init__(tied_module)
        self.cap = cap

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().__call__(x) / self.cap) * self.cap


def _gemma2(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
    """GEMMA2: torchtune's ``gemma2``/``lora_gemma2``, with the final soft-cap moved onto the logits."""
    _check_gemma("GEMMA2", config, lora)
    model = _torchtune(
        gemma2,
        lora_gemma2,
        lora,
        head_dim=config.head_dim,
        hidden_capping_value=config.attn_logit_softcapping,
        sliding_window_size=config.sliding_window,
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        **_common_dims(config, max_seq_len),
    )
    model.norm.logit_capping = nn.Identity()  # torchtune caps the hidden state here; HF caps logits
    if config.final_logit_softcapping is not None:
        model.output = SoftcappedTiedLinear(model.tok_embeddings, config.final_logit_softcapping)
    return model


def _phi3(config: ModelConfig, max_seq_len: int, lora: LoraSpec | None) -> TransformerDecoder:
    """PHI3_MINI: torchtune's ``phi3``/``lora_phi3``, tied to the embeddings when the config says so."""
    _check_rope("PHI3_MINI", config, (None,))
    _check_act("PHI3_MINI", config, ("silu",))
    odd_head_dim = config.head_dim != config.hidden_size // config.num_attention_heads
    _reject("PHI3_MINI", {f"head_dim {config.head_dim} != hidden_size / num_attention_heads": odd_head_dim})
    model = _torchtune(phi3, lora_phi3, lora, **_common_dims(config, max_seq_len))
    if config.tie_word_embeddings:
        del model.output  # an nn.Linear child module; a TiedLinear is a plain attribute
        model.output = _output("PHI3_MINI", config, model.tok_embeddings, lora)
    return model


REGISTRY: dict[str, Builder] = {
    "LLAMA2": _llama("LLAMA2"),
    "LLAMA3": _llama("LLAMA3"),
    "LLAMA3_2": _llama("LLAMA3_2"),
    "MISTRAL": _llama("MISTRAL"),
    "QWEN2": _qwen2,
    "QWEN3": _qwen3,
    "GEMMA": _gemma,
    "GEMMA2": _gemma2,
    "PHI3_MINI": _phi3,
    "QWEN3_MOE": _qwen3_moe,
    "MIXTRAL": _mixtral,
}
