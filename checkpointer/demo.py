"""``make demo``: a tiny Hugging Face model loaded into 2-process FSDP2, saved, checked by transformers.

Run with ``python -m checkpointer.demo [output folder]``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from checkpointer import DistributedHFCheckpointer, ModelConfig
from checkpointer.fsdp import build_sharded_model
from checkpointer.testing.multiprocess import run_on_ranks
from checkpointer.testing.tiny_models import write_tiny_model

MODEL_TYPE = "LLAMA3_2"
TOKENS = torch.tensor([[1, 17, 42, 99, 5, 63, 8, 2]])


def _rank_main(rank: int, world: int, base: str, out: str) -> dict:
    config = ModelConfig.from_json(Path(base, "config.json").read_text())
    model = build_sharded_model(MODEL_TYPE, config)
    checkpointer = DistributedHFCheckpointer(base, out, MODEL_TYPE)
    checkpointer.load_model(model)
    with torch.no_grad():
        logits = model(TOKENS)
    saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0)
    return {"logits": logits, "saved": saved, "read": checkpointer.last_load.bytes, "written": checkpointer.last_save.bytes}


def main(root: str = "demo_output") -> None:
    from transformers import AutoModelForCausalLM

    root_path = Path(root).resolve()
    shutil.rmtree(root_path, ignore_errors=True)
    base = write_tiny_model(
        MODEL_TYPE, root_path / "base", max_shard_size="40KB", hidden_size=72, num_attention_heads=9, num_key_value_heads=3
    )
    print(f"1. wrote a tiny Llama-architecture model (9 heads, 3 kv heads) to {base}")
    results = run_on_ranks(_rank_main, 2, str(base), str(root_path / "out"))
    for rank, result in enumerate(results):
        print(f"2. rank {rank}: read {result['read']} bytes of its FSDP2 shards, wrote {result['written']} bytes")
    saved = results[0]["saved"]
    print(f"3. saved as Hugging Face safetensors to {saved}: {sorted(p.name for p in Path(saved).iterdir())[:4]} ...")
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        saved_logits, base_logits = model(TOKENS).logits, reference(TOKENS).logits
    sharded_diff = (results[0]["logits"] - base_logits).abs().max().item()
    saved_diff = (saved_logits - base_logits).abs().max().item()
    print(f"4. transformers on the saved folder vs the base model: max logit difference {saved_diff:.2e}")
    print(f"   the 2-rank FSDP2 model vs transformers: max logit difference {sharded_diff:.2e}")
    if max(sharded_diff, saved_diff) > 1e-5:
        raise SystemExit("demo FAILED: logits differ")
    print("demo OK")


if __name__ == "__main__":
    main(*sys.argv[1:])
