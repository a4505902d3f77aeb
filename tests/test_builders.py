"""Builders against transformers: tiny random checkpoints, converted with torchtune's own converters.

For every model type (and tied/untied, GQA and odd-head variants) the torchtune model from
``build_model`` loads the converted state dict strictly and gives the same fp32 logits as
transformers' model (eager attention) to ``TOLERANCE``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models.convert_weights import hf_to_tune
from torchtune.models.gemma2._convert_weights import gemma2_hf_to_tune
from torchtune.models.phi3._convert_weights import phi3_hf_to_tune
from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune
from torchtune.modules import MultiHeadAttention, TiedLinear
from torchtune.training.checkpointing._utils import ModelType
from variants import ALL_VARIANTS, TOLERANCE, Variant

from checkpointer.format.model_config import ModelConfig
from checkpointer.testing.tiny_models import TINY_CONFIGS
from checkpointer.train.builders import REGISTRY, LoraSpec, build_model, build_model_from_dir, reset_rope_buffers

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


VARIANTS = [v for v in ALL_VARIANTS.values() if not v.fused_experts]  # the converters below read per-expert files
MOE_TYPES = {"QWEN3_MOE", "MIXTRAL"}


# --------------------------------------------------------------------------------------------
# HF -> torchtune conversion with torchtune's converters


def _dims(config: ModelConfig) -> dict[str, int]:
    return {
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "dim": config.hidden_size,
    }


def _llama_to_tune(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return hf_to_tune(sd, head_dim=config.head_dim, **_dims(config))


def _qwen2_to_tune(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return qwen2_hf_to_tune(
        sd, head_dim=config.head_dim, tie_word_embeddings=config.tie_word_embeddings, **_dims(config)
    )


# Qwen3 keys that torchtune 0.6.1's Qwen2 mapping lacks (torchtune 0.6.1 has no Qwen3).
_QWEN3_EXTRA = {
    r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight": r"layers.\1.attn.q_norm.scale",
    r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight": r"layers.\1.attn.k_norm.scale",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias": r"layers.\1.attn.output_proj.bias",
}


def _qwen3_to_tune(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    extra, rest = {}, {}
    for key, value in sd.items():
        new = next((re.sub(p, r, key) for p, r in _QWEN3_EXTRA.items() if re.fullmatch(p, key)), None)
        (rest if new is None else extra)[key if new is None else new] = value
    return _qwen2_to_tune(rest, config) | extra


def _gemma2_to_tune(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """torchtune's converter, with the pre/post-feedforward norms put right.

    torchtune 0.6.1 maps ``pre_feedforward_layernorm`` to ``mlp_scale`` and
    ``post_feedforward_layernorm`` to ``mlp_norm`` (pytorch/torchtune#2850); in
    ``TransformerSelfAttentionLayer`` ``mlp_norm`` is the norm *before* the MLP.
    """
    out = gemma2_hf_to_tune(sd, head_dim=config.head_dim, **_dims(config))
    for i in range(config.num_hidden_layers):
        out[f"layers.{i}.mlp_norm.scale"] = sd[f"model.layers.{i}.pre_feedforward_layernorm.weight"]
        out[f"layers.{i}.mlp_scale.scale"] = sd[f"model.layers.{i}.post_feedforward_layernorm.weight"]
    return out


def _phi3_to_tune(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return phi3_hf_to_tune(sd, **_dims(config))


def _experts_to_tune(
    dense: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]], block: str, names: tuple[str, str, str]
) -> Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]:
    """Stack each layer's per-expert ``names`` (gate, up, down) and take the router; ``dense`` converts the rest."""

    def convert(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        prefix = re.compile(rf"model\.layers\.(\d+)\.{block}\.")
        out = dense({k: v for k, v in sd.items() if not prefix.match(k)}, config)
        for i in range(config.num_hidden_layers):
            hf = f"model.layers.{i}.{block}"
            out[f"layers.{i}.mlp.router.weight"] = sd[f"{hf}.gate.weight"]
            for tune, name in zip(("gate_proj", "up_proj", "down_proj"), names):
                experts = [sd[f"{hf}.experts.{e}.{name}.weight"] for e in range(config.num_experts)]
                out[f"layers.{i}.mlp.experts.{tune}"] = torch.stack(experts)
        return out

    return convert


TO_TUNE: dict[str, Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]] = {
    "LLAMA2": _llama_to_tune,
    "LLAMA3": _llama_to_tune,
    "LLAMA3_2": _llama_to_tune,
    "MISTRAL": _llama_to_tune,
    "GEMMA": _llama_to_tune,
    "QWEN2": _qwen2_to_tune,
    "QWEN3": _qwen3_to_tune,
    "GEMMA2": _gemma2_to_tune,
    "PHI3_MINI": _phi3_to_tune,
    "QWEN3_MOE": _experts_to_tune(_qwen3_to_tune, "mlp", ("gate_proj", "up_proj", "down_proj")),
    "MIXTRAL": _experts_to_tune(_llama_to_tune, "block_sparse_moe", ("w1", "w3", "w2")),
}


# --------------------------------------------------------------------------------------------
# Fixtures


@dataclasses.dataclass
class Checkpoint:
    path: pathlib.Path
    config: ModelConfig
    tune_state_dict: dict[str, torch.Tensor]
    hf_logits: torch.Tensor


@pytest.fixture(scope="module")
def checkpoints(tiny_models: dict[str, pathlib.Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[Variant], Checkpoint]:
    """Each variant (the session's copy if it has one, else written once per module): its config, torchtune state dict, HF logits."""
    cache: dict[str, Checkpoint] = {}

    def get(v: Variant) -> Checkpoint:
        if v.name not in cache:
            path = tiny_models[v.name] if v.name in tiny_models else v.write(tmp_path_factory.mktemp("builders"))
            config = ModelConfig.from_json((path / "config.json").read_text())
            hf_sd = {k: t for f in sorted(path.glob("*.safetensors")) for k, t in load_file(f).items()}
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
            with torch.no_grad():
                logits = hf(TOKENS).logits
            cache[v.name] = Checkpoint(path, config, TO_TUNE[v.model_type](hf_sd, config), logits)
        return cache[v.name]

    return get


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# Logits against transformers


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: v.name)
def test_logits_match_transformers(v: Variant, checkpoints: Callable[[Variant], Checkpoint]) -> None:
    ckpt = checkpoints(v)
    model = build_model_from_dir(v.model_type, ckpt.path)
    model.load_state_dict(ckpt.tune_state_dict, strict=True)
    assert _max_diff(_logits(model), ckpt.hf_logits) <= TOLERANCE


def test_every_registered_type_has_a_variant() -> None:
    assert {v.model_type for v in VARIANTS} == set(REGISTRY) == set(TINY_CONFIGS)


@pytest.mark.parametrize("v", [v for v in VARIANTS if not v.overrides], ids=lambda v: v.name)
def test_tied_embeddings_have_no_output_key(v: Variant, checkpoints: Callable[[Variant], Checkpoint]) -> None:
    ckpt = checkpoints(v)
    model = build_model(v.model_type, ckpt.config)
    assert isinstance(model.output, TiedLinear) == ckpt.config.tie_word_embeddings
    assert ("output.weight" in model.state_dict()) != ckpt.config.tie_word_embeddings


def test_gemma2_key_names(checkpoints: Callable[[Variant], Checkpoint]) -> None:
    keys = set(build_model("GEMMA2", checkpoints(ALL_VARIANTS["gemma2"]).config).state_dict())
    layer0 = {k for k in keys if k.startswith("layers.0.")}
    assert "norm.rms_norm.scale" in keys and "output.weight" not in keys
    assert {f"layers.0.{n}.scale" for n in ("sa_norm", "sa_scale", "mlp_norm", "mlp_scale")} <= layer0


def test_qwen3_norms_come_before_rope(checkpoints: Callable[[Variant], Checkpoint]) -> None:
    """With torchtune 0.6.1's order (norm after RoPE) the perturbed q/k norms change the logits."""
    ckpt = checkpoints(ALL_VARIANTS["qwen3"])
    model = build_model("QWEN3", ckpt.config)
    model.load_state_dict(ckpt.tune_state_dict, strict=True)
    for layer in model.layers:
        layer.attn.__class__ = MultiHeadAttention  # torchtune 0.6.1's forward, same modules
    assert _max_diff(_logits(model), ckpt.hf_logits) > 100 * TOLERANCE


def test_qwen3_kv_cache_decoding_matches_full_forward(checkpoints: Callable[[Variant], Checkpoint]) -> None:
    """``QkNormBeforeRopeAttention`` has its own forward: check the KV-cache path too."""
    ckpt = checkpoints(ALL_VARIANTS["qwen3"])
    model = build_model("QWEN3", ckpt.config)
    model.load_state_dict(ckpt.tune_state_dict, strict=True)
    model.eval().setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=32)
    causal = torch.tril(torch.ones(32, 32, dtype=torch.bool))
    steps = [(0, 10)] + [(t, t + 1) for t in range(10, TOKENS.shape[1])]
    with torch.no_grad():
        logits = [
            model(
                TOKENS[:, a:b], input_pos=torch.arange(a, b).expand(2, -1), mask=causal[a:b].expand(2, -1, -1)
            )
            for a, b in steps
        ]
    assert _max_diff(torch.cat(logits, dim=1), ckpt.hf_logits) <= TOLERANCE


def test_sliding_window_shorter_than_max_seq_len_warns() -> None:
    with pytest.warns(UserWarning, match="sliding-window"):
        build_model("MISTRAL", _config("MISTRAL", sliding_window=64))


# --------------------------------------------------------------------------------------------
# Meta device, LoRA


@pytest.mark.parametrize("v", [v for v in VARIANTS if not v.overrides and v.tied is None], ids=lambda v: v.name)
def test_meta_build_to_empty_and_load(v: Variant, checkpoints: Callable[[Variant], Checkpoint]) -> None:
    ckpt = checkpoints(v)
    with torch.device("meta"):
        model = build_model(v.model_type, ckpt.config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert reset_rope_buffers(model) >= 1
    model.load_state_dict(ckpt.tune_state_dict, strict=True)
    assert _max_diff(_logits(model), ckpt.hf_logits) <= TOLERANCE


def _expected_lora_keys(model_type: str, config: ModelConfig, lora: LoraSpec) -> set[str]:
    layer_modules = [f"attn.{m}" for m in lora.lora_attn_modules]
    layer_modules += [f"mlp.{w}" for w in ("w1", "w2", "w3")] if lora.apply_lora_to_mlp else []
    modules = [f"layers.{i}.{m}" for i in range(config.num_hidden_layers) for m in layer_modules]
    modules += ["output"] if lora.apply_lora_to_output else []
    return {f"{m}.{ab}.weight" for m in modules for ab in ("lora_a", "lora_b")}


@pytest.mark.parametrize("v", [v for v in VARIANTS if not v.overrides], ids=lambda v: v.name)
def test_lora_adds_adapters_and_keeps_logits(
    v: Variant, checkpoints: Callable[[Variant], Checkpoint]
) -> None:
    ckpt = checkpoints(v)
    lora = LoraSpec(
        ("q_proj", "v_proj", "output_proj"),
        apply_lora_to_mlp=v.model_type not in MOE_TYPES,  # LoRA on experts is refused
        apply_lora_to_output=not ckpt.config.tie_word_embeddings,
        lora_rank=4,
    )
    model = build_model(v.model_type, ckpt.config, lora=lora)
    result = model.load_state_dict(ckpt.tune_state_dict, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == _expected_lora_keys(v.model_type, ckpt.config, lora)
    assert all(not p.any() for k, p in model.state_dict().items() if "lora_b" in k)
    assert _max_diff(_logits(model), ckpt.hf_logits) <= TOLERANCE


def test_lora_on_tied_output_is_rejected(checkpoints: Callable[[Variant], Checkpoint]) -> None:
    config = checkpoints(ALL_VARIANTS["llama3_2_tied_scaled"]).config
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        build_model("LLAMA3_2", config, lora=LoraSpec(("q_proj",), apply_lora_to_output=True))


def test_lora_spec_rejects_unknown_module() -> None:
    with pytest.raises(ValueError, match="w_gate"):
        LoraSpec(("q_proj", "w_gate"))


# --------------------------------------------------------------------------------------------
# Config handling and errors


def _config(model_type: str, **changes: Any) -> ModelConfig:
    raw = TINY_CONFIGS[model_type]().to_dict() | changes
    return ModelConfig.from_dict(raw)


def test_unknown_rope_type_is_named() -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        build_model("LLAMA3", _config("LLAMA3", rope_parameters=rope))


def test_unknown_model_type_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown model type 'GPT2'.*LLAMA3"):
        build_model("GPT2", _config("LLAMA3"))


def test_model_type_enum_and_lower_case_are_accepted() -> None:
    assert build_model(ModelType.LLAMA3, _config("LLAMA3")).max_seq_len == 256
    assert build_model("phi3_mini", _config("PHI3_MINI")).max_seq_len == 256


@pytest.mark.parametrize(
    ("model_type", "changes", "message"),
    [
        ("GEMMA", {"tie_word_embeddings": False}, "untied"),
        ("LLAMA3", {"hidden_act": "gelu"}, "activation 'gelu'"),
        ("LLAMA3", {"attention_bias": True}, "attention_bias"),
        ("PHI3_MINI", {"head_dim": 8}, "head_dim"),
    ],
)
def test_unsupported_configs_raise(model_type: str, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(model_type, _config(model_type, **changes))


def test_max_seq_len_defaults_to_capped_max_position_embeddings() -> None:
    assert build_model("LLAMA3", _config("LLAMA3")).max_seq_len == 256
    assert build_model("LLAMA3", _config("LLAMA3", max_position_embeddings=131072)).max_seq_len == 4096
    assert build_model("LLAMA3", _config("LLAMA3"), max_seq_len=64).max_seq_len == 64


def test_llama3_scaling_changes_some_frequencies() -> None:
    """The tiny LLAMA3_2 rope scaling is not a no-op at its head_dim (else the test proves nothing)."""
    config = _config("LLAMA3_2")
    scaled = build_model("LLAMA3_2", config).layers[0].attn.pos_embeddings.theta
    plain = (
        build_model("LLAMA3_2", dataclasses.replace(config, rope_scaling=None))
        .layers[0]
        .attn.pos_embeddings.theta
    )
    changed = (scaled != plain).sum().item()
    assert 0 < changed < len(plain)


def test_model_config_reads_builder_fields_in_both_spellings() -> None:
    old = {
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu",
        "attn_logit_softcapping": 50,
        "final_logit_softcapping": 30.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
    }
    new = {k: v for k, v in old.items() if k not in ("partial_rotary_factor", "rope_theta")}
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    for raw in (old, new):
        c = ModelConfig.from_dict(raw)
        assert (c.hidden_act, c.attn_logit_softcapping, c.final_logit_softcapping) == (
            "gelu_pytorch_tanh",
            50.0,
            30.0,
        )
        assert (c.query_pre_attn_scalar, c.sliding_window, c.partial_rotary_factor) == (256.0, 4096, 0.5)
        assert c.attention_bias is None and c.rope_scaling is None
    assert ModelConfig.from_dict(old | {"use_sliding_window": False}).sliding_window is None
