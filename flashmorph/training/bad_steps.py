"""Optimizer steps with NaN/Inf in the loss, gates or gradients: skipped on every rank, counted, and a stop after
too many in a row (a diverged run should end with a message, not train on garbage for days)."""

import logging

import torch

from flashmorph.errors import FlashMorphError
from flashmorph.parallel import distributed

log = logging.getLogger(__name__)

NUMERICAL_FAULT_EXIT_CODE = 4


class NumericalFault(FlashMorphError):
    """Too many optimizer steps in a row had non-finite values; the launcher exits with NUMERICAL_FAULT_EXIT_CODE."""

    exit_code = NUMERICAL_FAULT_EXIT_CODE


def any_rank_nonfinite(tensors, device) -> bool:
    """True on every rank when any of `tensors` holds a NaN or Inf on any rank (one all-reduce of a flag)."""
    local = any(not bool(torch.isfinite(t.detach()).all()) for t in tensors)
    return distributed.all_reduce_sum(torch.tensor([float(local)], device=device)).item() > 0


def poison(loss: torch.Tensor) -> torch.Tensor:
    """A loss whose gradients are NaN on every rank: DeepSpeed's ZeRO optimizers then find the global gradient norm
    invalid and discard the whole step (weights, optimizer moments and LR schedule untouched)."""
    return loss * float("nan")


class BadStepCounter:
    """Counts skipped steps (total, and in a row); `record` raises NumericalFault once `max_in_row` are reached."""

    def __init__(self, name: str, max_in_row: int, setting: str):
        self.name, self.max_in_row, self.setting = name, max_in_row, setting
        self.skipped = 0
        self.in_row = 0

    def record(self, step: int, bad: bool, where: str) -> None:
        """After optimizer step `step` (1-based): `bad` when it was skipped for non-finite `where`."""
        if not bad:
            self.in_row = 0
            return
        self.skipped += 1
        self.in_row += 1
        log.warning("%s step %d: non-finite %s on some rank; optimizer step skipped (%d in a row, %d in all)",
                    self.name, step, where, self.in_row, self.skipped)
        if self.in_row >= self.max_in_row:
            raise NumericalFault(
                f"{self.name} stopped at step {step}: {self.in_row} optimizer steps in a row had NaN/Inf {where} and "
                f"were skipped; lower the learning rate or check the data and model, then resume from the last "
                f"checkpoint with --resume (raise {self.setting} to tolerate longer runs of bad steps)")


def check_step_applied(engine, bad: bool, dtype: str, checked: str = "loss") -> tuple[bool, str]:
    """After the accumulation boundary's engine.step(): (was the step bad, what was non-finite). A step we marked
    bad that DeepSpeed applied anyway (ZeRO stage 0 has no such check) is an error: the weights now hold NaNs."""
    applied = engine.was_step_applied()
    if bad and applied:
        raise NumericalFault(f"a step with NaN/Inf {checked} was applied: DeepSpeed skips such steps only under "
                             "ZeRO (stages 1-3); set parallel.zero_stage to 1, 2 or 3")
    if bad:
        return True, checked
    # fp16's dynamic loss scaler skips overflowing steps by design while it finds its scale: not a fault
    if not applied and dtype != "float16":
        return True, "gradients"
    return False, ""
