"""Tensor-parallel plans for the model families we build, in the style of torchtune's ``base_llama_tp_plan``.

torchtune 0.6.1 ships a plan for Llama 3 only (``torchtune.models.llama3.base_llama_tp_plan``).
Every family we build (``train.builders``) is a ``TransformerDecoder`` with the same module
names (``attn.{q,k,v,output_proj}``, ``mlp.{w1,w2,w3}``, ``tok_embeddings``, ``output``), so
they share that plan's shape: q/k/v and the MLP's up projections column-wise (``Shard(0)``
weights and biases), the output and down projections row-wise (``Shard(1)``). Per-head norms
(Qwen3's ``q_norm``/``k_norm``) act on whole heads and stay replicated. A tied output
(``TiedLinear``) is not a module, so the ``output`` entry matches nothing there.

Use one from YAML as ``tensor_parallel_plan: {_component_: checkpointer.train.tp_plans.qwen2_tp_plan}``.
"""

from __future__ import annotations

from typing import Callable

from torch.distributed.tensor.parallel.style import ParallelStyle
from torchtune.models.llama3 import base_llama_tp_plan

from checkpointer.errors import CheckpointArgumentError

# Every family shares Llama's plan (see above); the names stay for YAML configs.
mistral_tp_plan = qwen2_tp_plan = qwen3_tp_plan = gemma_tp_plan = phi3_tp_plan = base_llama_tp_plan

TP_PLANS: dict[str, Callable[[], dict[str, ParallelStyle]]] = {
    "LLAMA2": base_llama_tp_plan,
    "LLAMA3": base_llama_tp_plan,
    "LLAMA3_2": base_llama_tp_plan,
    "MISTRAL": mistral_tp_plan,
    "QWEN2": qwen2_tp_plan,
    "QWEN3": qwen3_tp_plan,
    "GEMMA": gemma_tp_plan,
    "GEMMA2": gemma_tp_plan,
    "PHI3_MINI": phi3_tp_plan,
}


def tp_plan(model_type: str) -> dict[str, ParallelStyle]:
    """The plan for ``model_type``, or an error naming the known ones."""
    if model_type not in TP_PLANS:
        raise CheckpointArgumentError(
            f"no tensor-parallel plan for model_type {model_type!r}; known: {sorted(TP_PLANS)}; pass tensor_parallel_plan",
            key="tensor_parallel_plan",
        )
    return TP_PLANS[model_type]()
