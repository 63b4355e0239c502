"""The one training loop of gate search and distillation: micro steps under DeepSpeed, the NaN/Inf guard, tensorboard
and progress bar, periodic and final checkpoints, preemption and resume. A stage plugs in its step (`StageStep`)."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from flashmorph.checkpoint import atomic
from flashmorph.errors import Preempted
from flashmorph.run_dir import RunDir
from flashmorph.telemetry import MetricsWriter
from flashmorph.training.bad_steps import BadStepCounter, any_rank_nonfinite, check_step_applied, poison
from flashmorph.training.checkpointing import resume_checkpoint, save_checkpoint
from flashmorph.training.preemption import PreemptionGuard


@dataclass
class LoopConfig:
    name: str  # progress bar, log lines and NumericalFault messages: "gate search", "distill", "long_context"
    steps: int  # the optimizer step the run ends at
    log_every: int  # steps between tensorboard writes (the last step is always written)
    save_every: int  # steps between checkpoints (0 = only the final one)
    keep_last: int  # complete checkpoints kept on disk (0 = all)
    max_bad_steps: int  # NumericalFault after this many non-finite steps in a row
    max_bad_setting: str  # the recipe field NumericalFault names, e.g. "search.max_bad_steps"
    dtype: str  # the model dtype: fp16's loss scaler skips steps by design, which is no fault
    checked: str = "loss"  # what the guard checks, as the messages name it ("loss or gates")


@dataclass
class StepLog:
    """What a stage reports after a step, the same on every rank."""

    scalars: dict[str, float]  # tensorboard tags; the loop adds perf/* and numerics/skipped_steps after them
    tokens: float  # tokens the step processed on all ranks together, for perf/tokens_per_s
    postfix: dict[str, str]  # progress bar
    checkpoint_state: dict  # client state of a checkpoint at this step (read back on resume)
    gates: torch.Tensor | None = None  # gate values, logged as gate/layer_XX beside the scalars


class StageStep(Protocol):
    """A stage's optimizer step, cut where the loop needs to act between its parts."""

    engine: object  # the DeepSpeed engine the stage built

    def micro_batches(self, step: int):
        """The step's micro batches (any iterable), after whatever the step needs from all of them."""

    def micro_step(self, batch) -> tuple[torch.Tensor, tuple]:
        """Forward one micro batch: (the loss to backprop, further tensors the NaN/Inf guard checks)."""

    def finish(self, step: int) -> StepLog:
        """After the step's last engine.step(): its metrics, reduced over ranks."""


@dataclass
class LoopResult:
    start_step: int  # the first step this call ran (the resumed checkpoint's step, or 0)
    resumed: dict | None  # the resumed checkpoint's client state, with "step" and "resume" (for summary.json)
    last: StepLog | None  # the last step run; None when a resumed run had nothing left to do
    skipped_steps: int  # optimizer steps skipped for NaN/Inf in this call


def train(step_fn: StageStep, cfg: LoopConfig, run_dir: Path, info, *, resume: bool = False,
          resume_from: int | None = None, show_progress: bool = True,
          preemption: PreemptionGuard | None = None) -> LoopResult:
    """Run steps up to cfg.steps from the newest intact checkpoint (with `resume`) or from 0.

    With `preemption`, a stop signal on any rank ends the run after the current step with a complete checkpoint and
    raises `Preempted`. `resume_from` resumes from that step's checkpoint instead of the newest intact one."""
    engine, root = step_fn.engine, RunDir(run_dir).checkpoints
    state = resume_checkpoint(engine, root, info, resume_from) if resume or resume_from is not None else None
    start_step = state["step"] if state else 0
    writer = MetricsWriter(RunDir(run_dir).tb, enabled=info.is_main)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, disable=not (info.is_main and show_progress))
    bad_steps = BadStepCounter(cfg.name, cfg.max_bad_steps, cfg.max_bad_setting)
    last = None
    for step in range(start_step, cfg.steps):
        started = time.perf_counter()
        step_bad = False
        for batch in step_fn.micro_batches(step):
            loss, checked = step_fn.micro_step(batch)
            # every rank must agree before engine.step(): a NaN on one rank poisons the step on all of them
            step_bad = any_rank_nonfinite((loss, *checked), info.device) or step_bad
            engine.backward(poison(loss) if step_bad else loss)
            engine.step()
        bad, what = check_step_applied(engine, step_bad, cfg.dtype, cfg.checked)
        if bad:
            writer.scalars(step + 1, {"numerics/skipped_steps": bad_steps.skipped + 1})
        bad_steps.record(step + 1, bad, what)  # NumericalFault after cfg.max_bad_steps in a row
        last = step_fn.finish(step)
        elapsed = time.perf_counter() - started
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            writer.scalars(step + 1, {**last.scalars, "perf/tokens_per_s": last.tokens / elapsed,
                                      "perf/step_time_s": elapsed, "numerics/skipped_steps": bad_steps.skipped})
            if last.gates is not None:
                writer.gates(step + 1, last.gates)
        bar.update(1)
        bar.set_postfix(**last.postfix)
        periodic_save = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps
        if periodic_save:
            save_checkpoint(engine, root, step + 1, last.checkpoint_state, cfg.keep_last, info)
        if preemption is not None and step + 1 < cfg.steps and preemption.stop_requested(info.device):
            if not periodic_save:
                save_checkpoint(engine, root, step + 1, last.checkpoint_state, cfg.keep_last, info)
            bar.close()
            writer.close()
            raise Preempted(step + 1, atomic.checkpoint_dir(root, step + 1), preemption.reason)
    bar.close()
    if last is not None:  # storage failures: CheckpointError on every rank
        save_checkpoint(engine, root, cfg.steps, last.checkpoint_state, cfg.keep_last, info)
    writer.close()
    return LoopResult(start_step, state, last, bad_steps.skipped)
