"""Length curriculum of the long-context stage: global step -> seq_len, from stages of (seq_len, steps)."""

import bisect
import numbers
from collections.abc import Sequence

from flashmorph.errors import ConfigError


class LengthSchedule:
    """Stages run in order: the first `steps_0` steps (0 .. steps_0 - 1) at `seq_len_0`, the next `steps_1` at
    `seq_len_1`, ...; lengths strictly increase (a curriculum grows), every stage has at least one step."""

    def __init__(self, stages: Sequence[Sequence[int]]):
        if not isinstance(stages, Sequence) or isinstance(stages, str) or not stages:
            raise ConfigError(f"length schedule stages={stages!r} must be a non-empty list of [seq_len, steps]")
        parsed = []
        for position, stage in enumerate(stages):
            if not isinstance(stage, Sequence) or len(stage) != 2 or not all(_is_int(v) for v in stage):
                raise ConfigError(f"length schedule stage {position}={stage!r} must be a pair [seq_len, steps] of ints")
            seq_len, steps = int(stage[0]), int(stage[1])
            if seq_len < 1 or steps < 1:
                raise ConfigError(
                    f"length schedule stage {position}=[{seq_len}, {steps}] needs seq_len >= 1 and steps >= 1"
                )
            if parsed and seq_len <= parsed[-1][0]:
                raise ConfigError(
                    f"length schedule stage {position} has seq_len={seq_len} after {parsed[-1][0]}; "
                    "lengths must strictly increase (merge equal stages by adding their steps)"
                )
            parsed.append((seq_len, steps))
        self.stages: tuple[tuple[int, int], ...] = tuple(parsed)
        self._ends = []  # first global step after each stage
        for _, steps in parsed:
            self._ends.append((self._ends[-1] if self._ends else 0) + steps)

    @property
    def total_steps(self) -> int:
        return self._ends[-1]

    def stage_at(self, step: int) -> int:
        """Index of the stage that global step `step` (0-based) belongs to."""
        if not _is_int(step) or not 0 <= step < self.total_steps:
            raise IndexError(f"step {step!r} is outside the length schedule [0, {self.total_steps})")
        return bisect.bisect_right(self._ends, step)

    def seq_len_at(self, step: int) -> int:
        """The sequence length of global step `step` (0-based)."""
        return self.stages[self.stage_at(step)][0]

    def start_of(self, stage: int) -> int:
        """The first global step of stage `stage` (where a resumed run re-enters it)."""
        return ([0] + self._ends)[stage]

    def __repr__(self) -> str:
        return f"LengthSchedule({[list(s) for s in self.stages]})"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
