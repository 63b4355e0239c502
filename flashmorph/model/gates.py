"""The gates of a morphable model: one learnable logit per layer (or per layer and head), in one module."""

import math

import torch
from torch import nn


class MorphGates(nn.Module):
    """Owns every gate, so that the optimizer group, the regularizer and checkpoints see one object.

    A gate mixes a layer's attention as g * softmax + (1 - g) * linear with g = sigmoid(gate_logits).
    """

    def __init__(self, num_layers: int, num_heads: int | None = None, init_value: float = 0.88):
        super().__init__()
        if not 0.0 < init_value < 1.0:
            raise ValueError(f"gate init_value must lie in (0, 1), got {init_value}")
        shape = (num_layers,) if num_heads is None else (num_layers, num_heads)
        logit = math.log(init_value / (1.0 - init_value))
        self.gate_logits = nn.Parameter(torch.full(shape, logit, dtype=torch.float32))  # [layers] or [layers, heads]

    @property
    def per_head(self) -> bool:
        return self.gate_logits.dim() == 2

    @property
    def num_layers(self) -> int:
        return self.gate_logits.shape[0]

    def forward(self) -> torch.Tensor:
        """Gate values in (0, 1), fp32: [layers] or [layers, heads]."""
        return torch.sigmoid(self.gate_logits.float())

    def layer_scores(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """One score per layer (the mean over heads for per-head gates), used to rank layers."""
        values = self.forward().detach() if values is None else values
        return values.mean(dim=-1) if values.dim() == 2 else values
