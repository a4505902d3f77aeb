"""A mixture-of-experts feed-forward for torchtune's ``TransformerDecoder`` layers (torchtune 0.6.1 has none).

``MoEFeedForward`` takes the place of a layer's ``mlp``: a linear router picks the top-k
experts of each token from a softmax over all experts (renormalised over the k when
``norm_topk_prob``), and ``GroupedExperts`` runs SwiGLU experts whose weights are stacked
parameters in Hugging Face row orientation: ``gate_proj``/``up_proj`` ``[E, F, D]``,
``down_proj`` ``[E, D, F]``. FSDP2 shards dim 0, so each rank holds whole experts. This
computes what transformers' ``Qwen3MoeSparseMoeBlock``/``MixtralSparseMoeBlock`` compute.
Each forward keeps its router logits; :func:`router_aux_loss` turns them into the
Switch-Transformer load-balancing loss that transformers adds (``router_aux_loss_coef``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from checkpointer.errors import CheckpointArgumentError


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU feed-forwards with stacked weights (keys ``gate_proj``, ``up_proj``, ``down_proj``)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised as ``nn.Linear`` would be (the checkpoint overwrites it)."""
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` [tokens, dim]; ``experts``/``weights`` [tokens, k]: each token's experts and their weights."""
        out = torch.zeros_like(x)
        for expert in range(self.gate_proj.shape[0]):
            token, slot = torch.where(experts == expert)
            if token.numel() == 0:
                continue
            h = x[token]
            h = F.silu(F.linear(h, self.gate_proj[expert])) * F.linear(h, self.up_proj[expert])
            h = F.linear(h, self.down_proj[expert]) * weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out


class MoEFeedForward(nn.Module):
    """Router (key ``router.weight``, ``[E, dim]``) plus ``GroupedExperts`` (keys ``experts.*``)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise CheckpointArgumentError(
                f"num_experts_per_tok {top_k} must be between 1 and num_experts {num_experts}", key="num_experts_per_tok"
            )
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = GroupedExperts(dim, hidden_dim, num_experts)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.router_logits: torch.Tensor | None = None  # the last forward's, [tokens, E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.router_logits = logits
        return self.experts(flat, experts, weights.to(logits.dtype)).view(shape)


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The load-balancing loss over the MoE layers' last forward (transformers' ``load_balancing_loss_func``).

    ``num_experts * sum_e(fraction of top-k assignments to e * mean router probability of e)``,
    over the tokens of all layers; None for a model without MoE layers.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.router_logits is not None]
    if not layers:
        return None
    num_experts = layers[0].router_logits.shape[-1]
    assigned = torch.zeros(num_experts, device=layers[0].router_logits.device)
    probability = torch.zeros(num_experts, device=layers[0].router_logits.device)
    rows = 0
    for layer in layers:
        probs = F.softmax(layer.router_logits.float(), dim=-1)
        chosen = torch.topk(probs, layer.top_k, dim=-1).indices
        assigned = assigned + F.one_hot(chosen, num_experts).sum(dim=(0, 1)).float()
        probability = probability + probs.sum(dim=0)
        rows += probs.shape[0]
    return num_experts * torch.sum((assigned / rows) * (probability / rows))
