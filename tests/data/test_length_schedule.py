"""Length curriculum: global step -> seq_len along stages of (seq_len, steps)."""

import pytest

from flashmorph.data.length_schedule import LengthSchedule
from flashmorph.errors import ConfigError


def test_steps_map_to_their_stage():
    schedule = LengthSchedule([(4096, 3), (16384, 2), [131072, 1]])
    assert schedule.total_steps == 6
    assert [schedule.seq_len_at(step) for step in range(6)] == [4096] * 3 + [16384] * 2 + [131072]
    assert [schedule.stage_at(step) for step in range(6)] == [0, 0, 0, 1, 1, 2]
    assert [schedule.start_of(stage) for stage in range(3)] == [0, 3, 5]
    assert LengthSchedule([(128, 10)]).seq_len_at(9) == 128


@pytest.mark.parametrize("step", [-1, 6, 100, 1.5, None])
def test_steps_outside_the_schedule(step):
    with pytest.raises(IndexError, match=r"outside the length schedule \[0, 6\)"):
        LengthSchedule([(64, 3), (128, 3)]).seq_len_at(step)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "non-empty list"),
        ([(64, 3), (64, 2)], "must strictly increase"),
        ([(128, 3), (64, 2)], "must strictly increase"),
        ([(64, 0)], "steps >= 1"),
        ([(0, 5)], "seq_len >= 1"),
        ([(64, 3, 1)], "pair"),
        ([(64.0, 3)], "pair"),
        (["64"], "pair"),
    ],
)
def test_invalid_stages(stages, match):
    with pytest.raises(ConfigError, match=match):
        LengthSchedule(stages)
