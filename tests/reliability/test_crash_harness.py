"""The crash harness in CI: per stage, one uninterrupted run and FLASHMORPH_CRASH_TRIALS (default 1) seeded trials,
each SIGKILLed at a named point of a checkpoint or output write, then resumed with the launcher as users run it; the
outputs equal the uninterrupted run's bit for bit. Longer campaigns: python tests/reliability/crash_harness.py."""

import os
import random

import pytest

import crash_harness as harness

TRIALS = int(os.environ.get(harness.TRIALS_ENV, "1"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return harness.build_inputs(tmp_path_factory.mktemp("crash_inputs"))


@pytest.mark.parametrize("name", ["teacher", "gate_search", "distill"])
def test_a_stage_killed_mid_write_resumes_to_the_uninterrupted_outputs(inputs, tmp_path, name):
    stage = harness.stages(inputs)[name]
    reference, seconds = harness.reference_run(stage, tmp_path / "reference")
    rng = random.Random(f"{harness.DEFAULT_SEED}:{name}")
    for trial in range(TRIALS):
        kills = harness.plan_kills(stage, rng, seconds, max_kills=1, timed=0.0)
        result = harness.run_trial(stage, reference, tmp_path / f"trial_{trial}", kills)
        assert result["problems"] == [], result
        assert result["injected"] == len(kills), f"a kill site was not reached: {result}"
