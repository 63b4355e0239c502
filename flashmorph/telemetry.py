"""Tensorboard scalars under stable tag names, written by rank 0 only."""

from pathlib import Path

import torch


class MetricsWriter:
    """The event file is created at the first write, so a run that logs nothing (e.g. resuming a finished run)
    leaves no empty event file behind."""

    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer = None

    def _get(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        writer = self._get()
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)

    def gates(self, step: int, gate_values: torch.Tensor) -> None:
        """`gate/layer_07` per layer; per-head gates add `gate_head/layer_07/head_03`."""
        if not self.enabled:
            return
        writer = self._get()
        per_layer = gate_values.mean(-1) if gate_values.dim() == 2 else gate_values
        for layer, value in enumerate(per_layer.tolist()):
            writer.add_scalar(f"gate/layer_{layer:02d}", value, step)
        if gate_values.dim() == 2:
            for layer, row in enumerate(gate_values.tolist()):
                for head, value in enumerate(row):
                    writer.add_scalar(f"gate_head/layer_{layer:02d}/head_{head:02d}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
