"""Resuming on another GPU count stops with one line before DeepSpeed reads rank files of the wrong world."""

import pytest
import torch

from flashmorph.checkpoint import atomic
from flashmorph.errors import CheckpointError
from flashmorph.parallel.distributed import DistInfo
from flashmorph.training.checkpointing import resume_checkpoint


class _EngineThatMustNotLoad:
    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("the engine was asked to load a checkpoint of another world size")


def test_resume_on_another_world_size_is_one_error(tmp_path):
    staging = atomic.prepare_staging(tmp_path, 40)
    (staging / "state").mkdir()
    (staging / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 64)
    atomic.finalize(tmp_path, 40, {"step": 40, "world_size": 8})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(CheckpointError) as err:
        resume_checkpoint(_EngineThatMustNotLoad(), tmp_path, info)
    message = str(err.value)
    assert "written by 8 ranks and this job has 1" in message and "tools/reshard.py" in message
    assert "\n" not in message
