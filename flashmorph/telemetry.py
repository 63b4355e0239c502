"""Tensorboard scalars under stable tag names, written by rank 0 only."""

from pathlib import Path

import torch


class MetricsWriter:
    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def gates(self, step: int, gate_values: torch.Tensor) -> None:
        """`gate/layer_07` per layer; per-head gates add `gate_head/layer_07/head_03`."""
        if self._writer is None:
            return
        per_layer = gate_values.mean(-1) if gate_values.dim() == 2 else gate_values
        for layer, value in enumerate(per_layer.tolist()):
            self._writer.add_scalar(f"gate/layer_{layer:02d}", value, step)
        if gate_values.dim() == 2:
            for layer, row in enumerate(gate_values.tolist()):
                for head, value in enumerate(row):
                    self._writer.add_scalar(f"gate_head/layer_{layer:02d}/head_{head:02d}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
