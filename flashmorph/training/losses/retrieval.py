"""Gate search's loss: cross-entropy on the answer tokens of retrieval samples plus a linearization regularizer
on the gates, whose weight lambda may ramp up over the first steps."""

import torch


def regularizer(gate_values: torch.Tensor, kind: str, budget_fraction: float) -> torch.Tensor:
    """Linearization pressure: the mean gate, or only its excess over the budget fraction."""
    mean_gate = gate_values.mean()
    if kind == "mean":
        return mean_gate
    return torch.relu(mean_gate - budget_fraction)


def reg_lambda(step: int, weight: float, warmup_steps: int) -> float:
    """The regularizer's weight at 0-based `step`: ramps linearly to `weight` over `warmup_steps` (0 = constant)."""
    if warmup_steps == 0:
        return weight
    return weight * min(1.0, (step + 1) / warmup_steps)
