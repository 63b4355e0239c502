"""Turn learned gates into a hybrid layout: top-k under a budget (layers or heads) or a threshold on the gates."""

from dataclasses import dataclass
from pathlib import Path

import torch

from flashmorph.config import resolve_budget
from flashmorph.errors import ConfigError
from flashmorph.io.atomic import load_safetensors_verified
from flashmorph.selection.layout import HybridLayout, SelectionCost, layout_from_full_layers


@dataclass
class GateFile:
    path: Path
    gate_values: torch.Tensor  # [layers] or [layers, heads], in [0, 1]
    layer_scores: torch.Tensor  # [layers]: the gate, or its mean over heads
    metadata: dict[str, str]  # as gate search wrote it: granularity, num_layers, steps, model

    @property
    def num_layers(self) -> int:
        return self.gate_values.shape[0]

    @property
    def per_head(self) -> bool:
        return self.gate_values.dim() == 2


def load_gate_file(path: str | Path) -> GateFile:
    """Read gates.safetensors written by gate search; a file that is not one becomes a one-line ConfigError."""
    path = Path(path)
    tensors, metadata = load_safetensors_verified(path, with_metadata=True)
    fix = "point --gates at the gates.safetensors a gate search wrote"
    if "gate_values" not in tensors:
        raise ConfigError(f"--gates {path} holds no 'gate_values' tensor; {fix}")
    values = tensors["gate_values"].float()
    if values.dim() not in (1, 2) or values.numel() == 0:
        raise ConfigError(f"--gates {path}: gate_values has shape {list(values.shape)}, expected [layers] or "
                          f"[layers, heads]; {fix}")
    if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ConfigError(f"--gates {path}: gate_values must be finite and lie in [0, 1] (sigmoid of the logits); "
                          f"{fix}")
    scores = values.mean(dim=-1) if values.dim() == 2 else values
    if "layer_scores" in tensors and tensors["layer_scores"].shape != scores.shape:
        raise ConfigError(f"--gates {path}: layer_scores has shape {list(tensors['layer_scores'].shape)} but there "
                          f"are {values.shape[0]} layers; {fix}")
    declared = metadata.get("num_layers")
    if declared is not None and declared != str(values.shape[0]):
        raise ConfigError(f"--gates {path}: metadata says {declared} layers but gate_values has "
                          f"{values.shape[0]}; {fix}")
    return GateFile(path, values, scores, dict(metadata))


def check_threshold(threshold, flag: str = "--threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"{flag}={threshold!r} must be a gate value in [0, 1] (layers with gate >= it stay softmax)")
    return float(threshold)


def top_k_indices(scores, k: int) -> list[int]:
    """The k highest scores' indices, ascending; ties go to the lower index (stable sort)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if not 0 <= k <= scores.numel():
        raise ConfigError(f"cannot keep {k} of {scores.numel()} entries; choose k in [0, {scores.numel()}]")
    order = torch.sort(scores, descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def threshold_indices(scores, threshold: float) -> list[int]:
    """Indices whose score is >= threshold, ascending."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    return torch.nonzero(scores >= threshold).flatten().tolist()


def _as_values(gate_values) -> torch.Tensor:
    values = torch.as_tensor(gate_values, dtype=torch.float32)
    if values.dim() not in (1, 2) or values.numel() == 0:
        raise ConfigError(f"gate values must be [layers] or [layers, heads], got shape {list(values.shape)}")
    return values


def _layer_scores(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=-1) if values.dim() == 2 else values  # [layers]


def _floats(scores: torch.Tensor) -> list[float]:
    return [float(s) for s in scores]  # exact, so a report re-ranking them reproduces the selection


def discretize_top_k(gate_values, budget, inputs: dict | None = None) -> HybridLayout:
    """Keep the k layers with the highest gate (mean over heads for per-head gates) as softmax."""
    values = _as_values(gate_values)
    scores = _layer_scores(values)
    k = resolve_budget(budget, scores.numel())
    kept = top_k_indices(scores, k)
    return layout_from_full_layers(scores.numel(), kept, "gates", inputs={**(inputs or {}), "budget": budget, "k": k},
                                   layer_scores=_floats(scores), cost=SelectionCost())


def discretize_threshold(gate_values, threshold: float, inputs: dict | None = None) -> HybridLayout:
    """Keep every layer whose gate (mean over heads for per-head gates) is >= threshold as softmax."""
    values = _as_values(gate_values)
    scores = _layer_scores(values)
    threshold = check_threshold(threshold)
    kept = threshold_indices(scores, threshold)
    return layout_from_full_layers(scores.numel(), kept, "threshold",
                                   inputs={**(inputs or {}), "threshold": threshold, "k": len(kept)},
                                   layer_scores=_floats(scores), cost=SelectionCost())


def _per_head(values: torch.Tensor, flag: str) -> torch.Tensor:
    if values.dim() != 2:
        raise ConfigError(f"{flag} needs per-head gates [layers, heads]; these are per layer "
                          "(search with morph.gate_granularity=head, or select whole layers)")
    return values


def _head_layout(values: torch.Tensor, full: torch.Tensor, method: str, inputs: dict) -> HybridLayout:
    # full: [layers, heads] bool
    rows = [[bool(v) for v in row] for row in full.tolist()]
    layer_types = ["full" if any(row) else "linear" for row in rows]
    return HybridLayout(layer_types, method, inputs={**inputs, "num_full_heads": int(full.sum())},
                        full_heads=rows, layer_scores=_floats(_layer_scores(values)), cost=SelectionCost())


def discretize_heads_top_k(gate_values, budget=None, heads_per_layer: int | None = None,
                           inputs: dict | None = None) -> HybridLayout:
    """Head-level hybrid from per-head gates: the top heads overall (`budget`: a count or a fraction of all
    heads; ties go to the lower layer, then the lower head) or the top `heads_per_layer` heads of every layer."""
    values = _per_head(_as_values(gate_values), "a head-level budget")
    num_layers, num_heads = values.shape
    if (budget is None) == (heads_per_layer is None):
        raise ConfigError("give exactly one of --budget (heads overall) and --heads-per-layer for a head-level hybrid")
    full = torch.zeros(num_layers, num_heads, dtype=torch.bool)  # [layers, heads]
    if budget is not None:
        k = resolve_budget(budget, num_layers * num_heads, unit="heads")
        full.view(-1)[top_k_indices(values.reshape(-1), k)] = True  # row-major: layer-major, then head
        inputs = {**(inputs or {}), "budget": budget, "k_heads": k, "level": "head"}
    else:
        if isinstance(heads_per_layer, float):
            raise ConfigError(f"--heads-per-layer={heads_per_layer} must be an int count of heads per layer")
        per_layer = resolve_budget(heads_per_layer, num_heads, field="--heads-per-layer", unit="heads of a layer")
        for layer in range(num_layers):
            full[layer, top_k_indices(values[layer], per_layer)] = True
        inputs = {**(inputs or {}), "heads_per_layer": per_layer, "level": "head"}
    return _head_layout(values, full, "gates", inputs)


def discretize_heads_threshold(gate_values, threshold: float, inputs: dict | None = None) -> HybridLayout:
    """Head-level hybrid: every head whose gate is >= threshold keeps softmax."""
    values = _per_head(_as_values(gate_values), "a head-level threshold")
    threshold = check_threshold(threshold)
    return _head_layout(values, values >= threshold, "threshold",
                        {**(inputs or {}), "threshold": threshold, "level": "head"})
