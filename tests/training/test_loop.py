"""training/loop.py on its own, with a one-weight stand-in for the DeepSpeed engine (one process, no ranks): resume
continues exactly, a stop signal saves the step and raises Preempted, a NaN step is skipped and too many stop the run.
The stages' own runs under the real ZeRO-3 engine are in tests/stages and tests/training/test_bad_steps.py."""

import math
from pathlib import Path

import pytest
import torch

from flashmorph.checkpoint.atomic import list_checkpoints
from flashmorph.errors import Preempted
from flashmorph.parallel.distributed import DistInfo
from flashmorph.training.bad_steps import NumericalFault
from flashmorph.training.loop import LoopConfig, StepLog, train

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class FakeEngine:
    """SGD on one weight; like ZeRO, a step whose gradient is not finite is discarded and reported unapplied."""

    def __init__(self):
        self.weight = torch.zeros((), requires_grad=True)
        self.applied = True

    def backward(self, loss):
        loss.backward()

    def step(self):
        grad, self.weight.grad = self.weight.grad, None
        self.applied = bool(torch.isfinite(grad))
        if self.applied:
            with torch.no_grad():
                self.weight -= 0.1 * grad

    def was_step_applied(self):
        return self.applied

    def save_checkpoint(self, directory, tag, client_state, **kwargs):
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight.detach().clone(), "client": client_state}, path / "rank_0.pt")

    def load_checkpoint(self, directory, tag, **kwargs):
        state = torch.load(Path(directory) / tag / "rank_0.pt", weights_only=True)
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        return None, state["client"]


class PullToTarget:
    """Two micro batches per step pull the weight towards `target`; `nan_at` makes a step's loss NaN."""

    def __init__(self, engine, target=3.0, nan_at=()):
        self.engine, self.target, self.nan_at = engine, target, set(nan_at)
        self.micro_calls = 0

    def micro_batches(self, step):
        self.step, self.losses = step, []
        return [0.5, 1.5]

    def micro_step(self, scale):
        self.micro_calls += 1
        loss = scale * (self.engine.weight - self.target) ** 2
        if self.step in self.nan_at:
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return loss, ()

    def finish(self, step):
        loss = sum(self.losses)
        return StepLog({"loss/total": loss}, 2.0, {"loss": f"{loss:.3f}"}, {"loss": loss})


def _config(steps, **kw):
    return LoopConfig(**{"name": "toy", "steps": steps, "log_every": 1, "save_every": 0, "keep_last": 0,
                         "max_bad_steps": 2, "max_bad_setting": "toy.max_bad_steps", "dtype": "float32", **kw})


def _run(run_dir, steps, engine=None, **kw):
    engine = engine or FakeEngine()
    stage = PullToTarget(engine, nan_at=kw.pop("nan_at", ()))
    return train(stage, _config(steps, **kw.pop("config", {})), run_dir, INFO, show_progress=False, **kw), engine, stage


def test_resume_continues_exactly_and_a_finished_run_runs_nothing(tmp_path):
    whole, whole_engine, _ = _run(tmp_path / "whole", 4)
    assert whole.start_step == 0 and whole.resumed is None and whole.skipped_steps == 0
    assert [c.name for c in list_checkpoints(tmp_path / "whole" / "checkpoints")] == ["step_4"]
    _run(tmp_path / "split", 2)
    resumed, engine, stage = _run(tmp_path / "split", 4, resume=True)
    assert resumed.start_step == 2 and resumed.resumed["step"] == 2 and stage.micro_calls == 4
    assert torch.equal(engine.weight, whole_engine.weight)
    assert resumed.last.checkpoint_state == whole.last.checkpoint_state
    again, _, stage = _run(tmp_path / "split", 4, resume=True)
    assert again.last is None and stage.micro_calls == 0
    assert again.resumed["loss"] == whole.last.checkpoint_state["loss"]  # what the stage reports for a finished run


class StopAfter:
    """A PreemptionGuard stand-in: the stop signal arrives after `step` steps."""

    def __init__(self, step):
        self.calls, self.step, self.reason = 0, step, "SIGTERM"

    def stop_requested(self, device):
        self.calls += 1
        return self.calls >= self.step


def test_a_stop_signal_saves_the_step_and_raises_preempted(tmp_path):
    with pytest.raises(Preempted, match="step 3"):
        _run(tmp_path, 6, preemption=StopAfter(3), config={"save_every": 2})
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step_2", "step_3"]
    done, _, stage = _run(tmp_path, 6, resume=True)
    assert done.start_step == 3 and stage.micro_calls == 6


def test_a_nan_step_is_skipped_and_too_many_in_a_row_stop_the_run(tmp_path):
    clean, clean_engine, _ = _run(tmp_path / "clean", 2)
    skipped, engine, _ = _run(tmp_path / "nan", 3, nan_at={1})  # step 2 (1-based) is skipped, steps 1 and 3 train
    assert skipped.skipped_steps == 1 and torch.equal(engine.weight, clean_engine.weight)
    assert math.isfinite(skipped.last.checkpoint_state["loss"])  # the last step trained
    with pytest.raises(NumericalFault, match="toy stopped at step 3: 2 optimizer steps in a row had NaN/Inf loss"):
        _run(tmp_path / "stop", 5, nan_at={1, 2})
