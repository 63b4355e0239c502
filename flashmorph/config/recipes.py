"""The two recipe trees: gate search (with the embedded teacher) and distillation / long-context finetuning."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flashmorph.config.sections import (DistillConfig, ModelConfig, ParallelConfig, RunConfig, SearchConfig,
                                        StudentConfig, TeacherConfig)
from flashmorph.data.config import DataConfig
from flashmorph.data.text_config import TextDataConfig
from flashmorph.model.config import MorphConfig


class _Recipe:
    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what a run directory records as config.yaml)."""
        return dataclasses.asdict(self)


@dataclass
class GateSearchRecipe(_Recipe):
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    morph: MorphConfig = field(default_factory=MorphConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class DistillRecipe(_Recipe):
    run: RunConfig = field(default_factory=lambda: RunConfig(run_dir="runs/distill"))
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    morph: MorphConfig = field(default_factory=MorphConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def total_steps(self) -> int:
        schedule = self.distill.length_schedule
        return sum(s.steps for s in schedule) if schedule else self.distill.steps

    @property
    def max_seq_len(self) -> int:
        schedule = self.distill.length_schedule
        return max(s.seq_len for s in schedule) if schedule else self.data.seq_len
