"""The crash harness in CI: per stage, one uninterrupted run and FLASHMORPH_CRASH_TRIALS (default 1) seeded trials,
each SIGKILLed at a seeded point inside a checkpoint save (flashmorph/io/atomic.py: FAULT_SITES), then resumed by the
launcher as users run it: the outputs equal the uninterrupted run's. Longer: python tests/reliability/crash_harness.py"""

import dataclasses
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

import crash_harness as harness

TRIALS = int(os.environ.get(harness.TRIALS_ENV, "1"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return harness.build_inputs(tmp_path_factory.mktemp("crash_inputs"))


# CI time: each launch costs ~10 s of CPU (imports); gate search is killed and resumed in CI by
# tests/stages/test_gate_search.py, long-context shares distill's code path; the campaign runs all four
@pytest.mark.parametrize("name", ["teacher", "distill"])
def test_a_stage_killed_mid_write_resumes_to_the_uninterrupted_outputs(inputs, tmp_path, name):
    stage = harness.stages(inputs)[name]
    # inside a checkpoint save: the writes a timed kill rarely hits (the campaign kills at every site and at times)
    stage = dataclasses.replace(stage, sites={s: n for s, n in stage.sites.items() if s in harness.CHECKPOINT_SITES})
    rng = random.Random(f"{harness.DEFAULT_SEED}:{name}")
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run takes the second core meanwhile
        reference = pool.submit(harness.reference_run, stage, tmp_path / "reference")
        for trial in range(TRIALS):
            kills = harness.plan_kills(stage, rng, 0.0, max_kills=1, timed=0.0)
            result = harness.run_trial(stage, reference, tmp_path / f"trial_{trial}", kills)
            assert result["problems"] == [], result
            assert result["injected"] == len(kills), f"a kill site was not reached: {result}"
