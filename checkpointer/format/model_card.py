"""The README.md model card published with a Hub checkpoint."""

from __future__ import annotations

from typing import Any

CARD_MARKER = "<!-- written by checkpointer -->"


def model_card(repo_id: str, card: dict[str, Any]) -> str:
    """A Hub model card: YAML front matter (base_model, library_name, tags) and how it was trained.

    ``card`` holds ``base_model`` (a Hub repo id or None), ``checkpoint`` (e.g. ``epoch_2``),
    ``model_type``, ``dtype``, ``world_size`` and optional ``training`` details (a dict).
    """
    base = card.get("base_model")
    front = ["---", "library_name: transformers", "tags:", "- torchtune", "- checkpointer", "- fine-tuned"]
    if base:
        front.insert(1, f"base_model: {base}")
    front.append("---")
    lines = [
        *front,
        CARD_MARKER,
        f"# {repo_id.split('/')[-1]}",
        "",
        f"Fine-tuned from {f'[{base}](https://huggingface.co/{base})' if base else 'a base model'} "
        "with torchtune and FSDP2; saved shard by shard as Hugging Face safetensors by checkpointer.",
        "",
        f"- checkpoint: `{card.get('checkpoint')}`",
        f"- model type: `{card.get('model_type')}`, weights in `{card.get('dtype')}`",
        f"- trained on {card.get('world_size', 1)} rank(s)",
    ]
    for key, value in sorted((card.get("training") or {}).items()):
        lines.append(f"- {key}: `{value}`")
    lines += ["", "```python", "from transformers import AutoModelForCausalLM", "", f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", ""]
    return "\n".join(lines)


def hub_repo_id(location: object) -> str | None:
    """The repo id when ``location`` is on the Hub (for a model card's ``base_model``), else None."""
    return getattr(getattr(location, "hub_url", None), "repo_id", None)


def card_info(name: str, base_model: str | None, model_type: str | None, dtype: str | None, world_size: int = 1) -> dict[str, Any]:
    """The fields :func:`model_card` reads (``training`` empty: add it when known)."""
    return {"base_model": base_model, "checkpoint": name, "model_type": model_type, "dtype": dtype, "world_size": world_size, "training": {}}
