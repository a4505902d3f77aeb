"""Key maps: how each model type's torchtune keys and rows correspond to Hugging Face ones.

A key_map is a declarative table of :class:`Rule` s, one per tensor kind, with ``{}``
standing for the layer index. A rule may say that rows are RoPE-permuted within each
head, or that the tensor is one part of a fused Hugging Face tensor (Phi-3's
``qkv_proj`` and ``gate_up_proj``: parts are stacked along dim 0 in rule order).

Mixture-of-experts tensors are stacked in torchtune (``[E, F, D]``, dim 0 the expert) and
stored either as one Hugging Face tensor per expert (``experts`` = :data:`PER_EXPERT`, the
HF pattern's last ``{}`` is the expert index) or as one fused 3-D tensor (:data:`STACKED`,
parts such as gate and up joined along dim 1 within each expert). A key map may carry
*variants*: alternative rules for some tune keys, chosen by the keys a checkpoint holds
(:meth:`KeyMap.for_hf_keys`), so that a fused checkpoint loads and saves back fused.
:data:`KEY_MAPS` is the registry by torchtune model type name; no code branches on
model types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from checkpointer.errors import CheckpointArgumentError, CheckpointMismatchError
from checkpointer.format.model_config import ModelConfig
from checkpointer.format.peft import PEFT_PREFIX
from checkpointer.mapping.row_runs import RowRun, identity_runs, rope_runs

_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.)")

PartRows = Callable[[ModelConfig], int]
PER_EXPERT = "per_expert"  # one HF tensor [F, D] per expert for a stacked tune tensor [E, F, D]
STACKED = "stacked"  # one HF tensor [E, F, D] (parts joined along dim 1) for a stacked tune tensor


@dataclass(frozen=True)
class Rule:
    """One torchtune key pattern and the Hugging Face key pattern it is stored under.

    ``rope``: rows are permuted within each head of ``head_dim`` rows.
    ``part_rows``: this tensor is one part of a fused HF tensor; the function gives its
    row count from the config (used only when no model is at hand to tell the shapes).
    ``experts``: the tune tensor's dim 0 is the expert: :data:`PER_EXPERT` or :data:`STACKED`
    (its rows, and the rows of its parts, are then those of one expert: tune dim 1).
    """

    tune: str
    hf: str
    rope: bool = False
    part_rows: PartRows | None = None
    experts: str | None = None

    @property
    def part_dim(self) -> int:
        """The tune dimension along which parts of a fused HF tensor are joined (rows within an expert)."""
        return 1 if self.experts else 0


def _abstract(key: str) -> tuple[str, tuple[str, ...]]:
    """``layers.3.attn.q_proj.weight`` -> (``layers.{}.attn.q_proj.weight``, ("3",))."""
    return _LAYER_INDEX.sub(".{}", key), tuple(_LAYER_INDEX.findall(key))


def _fill(pattern: str, indices: tuple[str, ...]) -> str:
    """``pattern`` with its first ``{}`` s replaced by ``indices``; any further ``{}`` stay (the expert)."""
    first, *rest = pattern.split("{}")
    return first + "".join((indices[i] if i < len(indices) else "{}") + piece for i, piece in enumerate(rest))


def expert_key(hf_key: str, expert: int) -> str:
    """The per-expert HF key of ``expert`` in a target key that still has its expert ``{}``."""
    return hf_key.replace("{}", str(expert))


def stored_keys(hf_key: str, rule: Rule, experts: int) -> list[str]:
    """The HF keys a tensor of ``rule`` stored at ``hf_key`` occupies: one per expert for a per-expert rule."""
    return [expert_key(hf_key, e) for e in range(experts)] if rule.experts == PER_EXPERT else [hf_key]


@dataclass(frozen=True)
class Target:
    """Where a torchtune tensor lives in the Hugging Face checkpoint."""

    hf_key: str  # for PER_EXPERT rules, with ``{}`` left for the expert (see :func:`expert_key`)
    rule: Rule
    parts: tuple[str, ...]  # the tune keys stacked into hf_key, in order (one for unfused tensors)


class KeyMap:
    """The key_map map of one model type, bound to a config for head dimensions."""

    def __init__(
        self,
        name: str,
        rules: Iterable[Rule],
        config: ModelConfig,
        ignored_hf: Iterable[str] = (),
        tied: dict[str, str] | None = None,
        variants: Iterable[Iterable[Rule]] = (),
    ):
        self.name = name
        self.tied = dict(tied or {})  # HF key that may be absent -> the HF key it is tied to
        self.config = config
        self.rules = tuple(rules)
        self.variants = tuple(tuple(v) for v in variants)
        self._ignored_hf = tuple(ignored_hf)
        self._by_tune = {r.tune: r for r in self.rules}
        self._by_hf: dict[str, list[Rule]] = {}
        for rule in self.rules:
            self._by_hf.setdefault(rule.hf, []).append(rule)
        self._ignored = [re.compile(p) for p in ignored_hf]

    def target(self, tune_key: str) -> Target:
        """The HF key that stores ``tune_key``; raises for keys this model type does not know."""
        pattern, layer = _abstract(tune_key)
        rule = self._by_tune.get(pattern)
        if rule is None:
            raise CheckpointMismatchError(
                f"{self.name}: no Hugging Face name is known for torchtune key {tune_key!r}; "
                "is model_type right for this model?",
                key=tune_key,
            )
        parts = tuple(_fill(r.tune, layer) for r in self._by_hf[rule.hf])
        return Target(_fill(rule.hf, layer), rule, parts)

    def tune_keys(self, hf_key: str) -> list[str] | None:
        """The torchtune keys stored in ``hf_key`` (several for a fused tensor), or None if unknown."""
        pattern, layer = _abstract(hf_key)
        rules = self._by_hf.get(pattern)
        return [_fill(r.tune, layer) for r in rules] if rules else None

    def for_hf_keys(self, hf_keys: Iterable[str]) -> KeyMap:
        """This key map with the variant whose HF keys the checkpoint holds (itself when none is held)."""
        patterns = {_abstract(key)[0] for key in hf_keys}
        own = {rule.hf for rule in self.rules}
        for variant in self.variants:
            if patterns & ({rule.hf for rule in variant} - own):
                return KeyMap(self.name, _with_variant(self.rules, variant), self.config, self._ignored_hf, self.tied)
        return self

    def is_ignored(self, hf_key: str) -> bool:
        """HF keys that carry no weights for torchtune (e.g. cached RoPE frequencies)."""
        return any(p.fullmatch(hf_key) for p in self._ignored)

    def part_rows(self, tune_key: str) -> int | None:
        """Rows of a fused part, from the config; None for unfused tensors."""
        rule = self.target(tune_key).rule
        return rule.part_rows(self.config) if rule.part_rows else None

    def runs(self, rule: Rule, start: int, stop: int, part_offset: int = 0) -> list[RowRun]:
        """Pieces for tune rows ``[start, stop)`` of a tensor of ``rule``; ``part_offset`` is its first HF row."""
        if rule.rope:
            return rope_runs(start, stop, self.config.head_dim, part_offset)
        return identity_runs(start, stop, part_offset)


KeyMapFactory = Callable[[ModelConfig], KeyMap]
KEY_MAPS: dict[str, KeyMapFactory] = {}


@dataclass(frozen=True)
class _KeySet:
    """The HF key patterns of a key_map: those a checkpoint must hold, may hold, and may carry unused."""

    required: frozenset[str]
    optional: frozenset[str]  # tied copies (lm_head.weight)
    with_rule: frozenset[str]
    ignored: tuple[re.Pattern, ...]
    hf_model_types: frozenset[str]  # config.json "model_type" values of the models it serves
    rules: tuple[Rule, ...]

    def known(self, key: str, pattern: str, tied: bool | None) -> bool:
        if pattern in self.required or any(p.fullmatch(key) for p in self.ignored):
            return True
        return pattern in self.optional and (tied is not False or pattern in self.with_rule)


_KEY_SETS: dict[str, _KeySet] = {}
_VARIANT_KEY_SETS: dict[str, tuple[_KeySet, ...]] = {}  # the same model types stored another way


def register_key_map(
    name: str,
    rules: Iterable[Rule],
    ignored_hf: Iterable[str] = (),
    tied: dict[str, str] | None = None,
    hf_model_types: Iterable[str] = (),
    variants: Iterable[Iterable[Rule]] = (),
) -> None:
    """Add a model type to the registry (``hf_model_types``: the config.json ``model_type`` values it serves).

    ``variants``: alternative rules for some tune keys, for checkpoints stored another way
    (see :meth:`KeyMap.for_hf_keys`).
    """
    rules, ignored_hf, tied = tuple(rules), tuple(ignored_hf), dict(_TIED_OUTPUT if tied is None else tied)
    variants = tuple(tuple(v) for v in variants)
    KEY_MAPS[name] = lambda config: KeyMap(name, rules, config, ignored_hf, tied, variants)
    ignored = tuple(re.compile(p) for p in ignored_hf)
    _KEY_SETS[name] = _KeySet(*_hf_patterns(rules, tied), ignored, frozenset(hf_model_types), rules)
    _VARIANT_KEY_SETS[name] = tuple(
        _KeySet(*_hf_patterns(_with_variant(rules, v), tied), ignored, frozenset(hf_model_types), rules)
        for v in variants
    )


def _hf_patterns(rules: tuple[Rule, ...], tied: dict[str, str]) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The required, optional (tied) and ruled HF key patterns of ``rules``."""
    with_rule = frozenset(r.hf for r in rules)
    return with_rule - set(tied), frozenset(tied), with_rule


def _with_variant(rules: Iterable[Rule], variant: Iterable[Rule]) -> tuple[Rule, ...]:
    """``rules`` with those of the tune keys that ``variant`` covers replaced by ``variant`` 's."""
    variant = tuple(variant)
    replaced = {rule.tune for rule in variant}
    return (*(r for r in rules if r.tune not in replaced), *variant)


def hf_model_types_for(name: str) -> frozenset[str]:
    """config.json ``model_type`` values whose checkpoints key_map ``name`` converts correctly.

    Layouts with the same rules (LLAMA2/3/3_2 and MISTRAL) accept each other's models.
    """
    own = _KEY_SETS[name]
    return frozenset(t for key_set in _KEY_SETS.values() if key_set.rules == own.rules for t in key_set.hf_model_types)


def key_maps_for_hf_model_type(hf_model_type: str) -> list[str]:
    """The registered layouts that convert a config.json ``model_type`` correctly."""
    return sorted(name for name in _KEY_SETS if hf_model_type in hf_model_types_for(name))


def model_types_for_keys(hf_keys: Iterable[str], tied: bool | None = None, hf_model_type: str | None = None) -> list[str]:
    """The registered model types whose key_map names exactly these Hugging Face keys (any number of layers).

    Several types share one key key_map (LLAMA2, LLAMA3, LLAMA3_2 and MISTRAL; a tied checkpoint
    also looks like GEMMA): all are returned, sorted, unless the config's ``hf_model_type``
    (``"llama"``, ``"gemma"``...) narrows them. ``tied`` (the config's ``tie_word_embeddings``)
    tells whether an ``lm_head.weight`` needs a rule of its own.
    """
    keys = [(key, _abstract(key)[0]) for key in hf_keys]
    patterns = {pattern for _, pattern in keys}
    layouts = [(name, key_set) for name, key_set in _KEY_SETS.items()]
    layouts += [(name, key_set) for name, variants in _VARIANT_KEY_SETS.items() for key_set in variants]
    matches = {
        name: key_set
        for name, key_set in layouts
        if keys and all(key_set.known(k, p, tied) for k, p in keys) and key_set.required <= patterns
    }
    narrowed = [name for name, key_set in matches.items() if hf_model_type in key_set.hf_model_types]
    return sorted(narrowed or matches)


def get_key_map(model_type: object, config: ModelConfig) -> KeyMap:
    """The key_map for a torchtune model type (a name like ``"LLAMA3_2"`` or a ``ModelType``)."""
    name = str(getattr(model_type, "name", model_type)).upper()
    if name not in KEY_MAPS:
        raise CheckpointArgumentError(f"model_type {model_type!r} is not supported; choose one of {sorted(KEY_MAPS)}", key="model_type")
    return KEY_MAPS[name](config)


# ---- the tables -------------------------------------------------------------------------

_L = "layers.{}."
_H = "model.layers.{}."
# With tied embeddings the file may omit lm_head.weight (or hold a copy of the embedding).
_TIED_OUTPUT = {"lm_head.weight": "model.embed_tokens.weight"}
_ROTARY_CACHE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _attention(*, rope: bool, bias: bool = False, qk_norm: bool = False) -> list[Rule]:
    rules = [
        Rule(_L + "attn.q_proj.weight", _H + "self_attn.q_proj.weight", rope=rope),
        Rule(_L + "attn.k_proj.weight", _H + "self_attn.k_proj.weight", rope=rope),
        Rule(_L + "attn.v_proj.weight", _H + "self_attn.v_proj.weight"),
        Rule(_L + "attn.output_proj.weight", _H + "self_attn.o_proj.weight"),
    ]
    if bias:
        rules += [
            Rule(_L + "attn.q_proj.bias", _H + "self_attn.q_proj.bias", rope=rope),
            Rule(_L + "attn.k_proj.bias", _H + "self_attn.k_proj.bias", rope=rope),
            Rule(_L + "attn.v_proj.bias", _H + "self_attn.v_proj.bias"),
        ]
    if qk_norm:
        rules += [
            Rule(_L + "attn.q_norm.scale", _H + "self_attn.q_norm.weight"),
            Rule(_L + "attn.k_norm.scale", _H + "self_attn.k_norm.weight"),
        ]
    return rules


_MLP = [
    Rule(_L + "mlp.w1.weight", _H + "mlp.gate_proj.weight"),
    Rule(_L + "mlp.w2.weight", _H + "mlp.down_proj.weight"),
    Rule(_L + "mlp.w3.weight", _H + "mlp.up_proj.weight"),
]
_NORMS = [
    Rule(_L + "sa_norm.scale", _H + "input_layernorm.weight"),
    Rule(_L + "mlp_norm.scale", _H + "post_attention_layernorm.weight"),
]
_EMBED = Rule("tok_embeddings.weight", "model.embed_tokens.weight")
_OUTPUT = Rule("output.weight", "lm_head.weight")
_FINAL_NORM = Rule("norm.scale", "model.norm.weight")

_LLAMA = [_EMBED, *_attention(rope=True), *_MLP, *_NORMS, _FINAL_NORM, _OUTPUT]
_QWEN2 = [_EMBED, *_attention(rope=False, bias=True), *_MLP, *_NORMS, _FINAL_NORM, _OUTPUT]
_QWEN3 = [_EMBED, *_attention(rope=False, qk_norm=True), *_MLP, *_NORMS, _FINAL_NORM, _OUTPUT]
# Gemma 2 has four norms per layer. torchtune applies mlp_norm before the MLP and
# mlp_scale after it, so HF's pre_feedforward norm is mlp_norm. (torchtune 0.6.1's own
# gemma2 converter maps these two the other way round.)
_GEMMA2 = [
    _EMBED,
    *_attention(rope=True),
    *_MLP,
    Rule(_L + "sa_norm.scale", _H + "input_layernorm.weight"),
    Rule(_L + "sa_scale.scale", _H + "post_attention_layernorm.weight"),
    Rule(_L + "mlp_norm.scale", _H + "pre_feedforward_layernorm.weight"),
    Rule(_L + "mlp_scale.scale", _H + "post_feedforward_layernorm.weight"),
    Rule("norm.rms_norm.scale", "model.norm.weight"),
]


def _q_rows(c: ModelConfig) -> int:
    return c.num_attention_heads * c.head_dim


def _kv_rows(c: ModelConfig) -> int:
    return c.num_key_value_heads * c.head_dim


def _ffn_rows(c: ModelConfig) -> int:
    c.require("intermediate_size", purpose="splitting the fused gate_up_proj")
    return c.intermediate_size


_PHI3 = [
    _EMBED,
    Rule(_L + "attn.q_proj.weight", _H + "self_attn.qkv_proj.weight", part_rows=_q_rows),
    Rule(_L + "attn.k_proj.weight", _H + "self_attn.qkv_proj.weight", part_rows=_kv_rows),
    Rule(_L + "attn.v_proj.weight", _H + "self_attn.qkv_proj.weight", part_rows=_kv_rows),
    Rule(_L + "attn.output_proj.weight", _H + "self_attn.o_proj.weight"),
    Rule(_L + "mlp.w1.weight", _H + "mlp.gate_up_proj.weight", part_rows=_ffn_rows),
    Rule(_L + "mlp.w3.weight", _H + "mlp.gate_up_proj.weight", part_rows=_ffn_rows),
    Rule(_L + "mlp.w2.weight", _H + "mlp.down_proj.weight"),
    *_NORMS,
    _FINAL_NORM,
    _OUTPUT,
]


def _expert_rows(c: ModelConfig) -> int:
    return c.moe_intermediate_size or c.intermediate_size


def _moe(hf_block: str, router: str, gate: str, up: str, down: str) -> list[Rule]:
    """A mixture-of-experts feed-forward stored one tensor per expert, as transformers' ``save_pretrained`` writes it."""
    experts = _H + hf_block + ".experts.{}."
    return [
        Rule(_L + "mlp.router.weight", _H + f"{hf_block}.{router}.weight"),
        Rule(_L + "mlp.experts.gate_proj", experts + f"{gate}.weight", experts=PER_EXPERT),
        Rule(_L + "mlp.experts.up_proj", experts + f"{up}.weight", experts=PER_EXPERT),
        Rule(_L + "mlp.experts.down_proj", experts + f"{down}.weight", experts=PER_EXPERT),
    ]


# The fused layout transformers 5 holds in memory (``experts.gate_up_proj [E, 2F, D]``, gate rows first).
_FUSED_EXPERTS = [
    Rule(_L + "mlp.router.weight", _H + "mlp.gate.weight"),
    Rule(_L + "mlp.experts.gate_proj", _H + "mlp.experts.gate_up_proj", part_rows=_expert_rows, experts=STACKED),
    Rule(_L + "mlp.experts.up_proj", _H + "mlp.experts.gate_up_proj", part_rows=_expert_rows, experts=STACKED),
    Rule(_L + "mlp.experts.down_proj", _H + "mlp.experts.down_proj", experts=STACKED),
]
_MOE_NORMS_FINAL = [*_NORMS, _FINAL_NORM, _OUTPUT]
_QWEN3_MOE = [_EMBED, *_attention(rope=False, qk_norm=True), *_moe("mlp", "gate", "gate_proj", "up_proj", "down_proj"), *_MOE_NORMS_FINAL]
_MIXTRAL = [_EMBED, *_attention(rope=True), *_moe("block_sparse_moe", "gate", "w1", "w3", "w2"), *_MOE_NORMS_FINAL]

for _name in ("LLAMA2", "LLAMA3", "LLAMA3_2"):
    register_key_map(_name, _LLAMA, _ROTARY_CACHE, hf_model_types=["llama"])
register_key_map("MISTRAL", _LLAMA, _ROTARY_CACHE, hf_model_types=["mistral"])
# torchtune's REWARD: a Mistral sequence classifier whose one-class ``score`` head is torchtune's output;
# a ``score.bias`` some conversions carry is not part of torchtune's model.
register_key_map(
    "REWARD", [r for r in _LLAMA if r is not _OUTPUT] + [Rule("output.weight", "score.weight")],
    (*_ROTARY_CACHE, r"score\.bias"), tied={}, hf_model_types=["mistral"],
)  # fmt: skip
register_key_map("GEMMA", [r for r in _LLAMA if r is not _OUTPUT], _ROTARY_CACHE, hf_model_types=["gemma"])
register_key_map("GEMMA2", _GEMMA2, _ROTARY_CACHE, hf_model_types=["gemma2"])
register_key_map("QWEN2", _QWEN2, _ROTARY_CACHE, hf_model_types=["qwen2"])
register_key_map("QWEN3", _QWEN3, _ROTARY_CACHE, hf_model_types=["qwen3"])
register_key_map("PHI3_MINI", _PHI3, _ROTARY_CACHE, hf_model_types=["phi3"])
register_key_map("QWEN3_MOE", _QWEN3_MOE, _ROTARY_CACHE, hf_model_types=["qwen3_moe"], variants=[_FUSED_EXPERTS])
register_key_map("MIXTRAL", _MIXTRAL, _ROTARY_CACHE, hf_model_types=["mixtral"], variants=[_FUSED_EXPERTS])


# ---- LoRA adapters in PEFT's format ----------------------------------------------------------

ADAPTER_MARKERS = (".lora_a.", ".lora_b.")


def is_adapter_key(tune_key: str) -> bool:
    """LoRA parameters (torchtune's ``lora_a``/``lora_b``), which live in the adapter file."""
    return any(marker in tune_key for marker in ADAPTER_MARKERS)


def adapter_key_map(base: KeyMap) -> KeyMap:
    """PEFT names for LoRA parameters: derived from the base rules of the wrapped linears.

    ``lora_a`` (rank x in) keeps its rows; ``lora_b`` (out x rank) rows are the base weight's
    output rows, so they are RoPE-permuted exactly when the base weight is. Fused HF tensors
    (Phi-3's ``qkv_proj``) have no PEFT counterpart for separate q/k/v adapters.
    """
    rules = []
    for rule in base.rules:
        if not rule.tune.endswith(".weight") or rule.part_rows or rule.experts:
            continue
        tune, hf = rule.tune.removesuffix(".weight"), PEFT_PREFIX + rule.hf.removesuffix(".weight")
        rules.append(Rule(f"{tune}.lora_a.weight", f"{hf}.lora_A.weight"))
        rules.append(Rule(f"{tune}.lora_b.weight", f"{hf}.lora_B.weight", rope=rule.rope))
    return KeyMap(f"{base.name} LoRA adapter", rules, base.config)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA parameters (sharded like the model)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}

