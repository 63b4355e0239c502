"""The crash harness in CI: per stage, one uninterrupted run and FLASHMORPH_CRASH_TRIALS (default 1) seeded trials,
each SIGKILLed at a seeded point inside a checkpoint save (flashmorph/io/atomic.py: FAULT_SITES), then resumed by the
launcher as users run it: the outputs equal the uninterrupted run's. Longer: python tests/reliability/crash_harness.py"""

import dataclasses
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

import crash_harness as harness

TRIALS = int(os.environ.get(harness.TRIALS_ENV, "1"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return harness.build_inputs(tmp_path_factory.mktemp("crash_inputs"))


@pytest.fixture(scope="module")
def crashed(inputs, tmp_path_factory):
    """crashed(name) -> (stage, uninterrupted run dir, [trial results]), each stage run once per module."""
    done = {}

    def run(name):
        if name not in done:
            stage = harness.stages(inputs)[name]
            # inside a checkpoint save: the writes a timed kill rarely hits (the campaign also kills at times)
            stage = dataclasses.replace(stage, sites={s: n for s, n in stage.sites.items()
                                                      if s in harness.CHECKPOINT_SITES})
            rng = random.Random(f"{harness.DEFAULT_SEED}:{name}")
            workdir = tmp_path_factory.mktemp(name)
            with ThreadPoolExecutor(1) as pool:  # the uninterrupted run takes the second core meanwhile
                reference = pool.submit(harness.reference_run, stage, workdir / "reference")
                results = [harness.run_trial(stage, reference, workdir / f"trial_{trial}",
                                             harness.plan_kills(stage, rng, 0.0, max_kills=1, timed=0.0))
                           for trial in range(TRIALS)]
            done[name] = stage, reference.result()[0], results
        return done[name]

    return run


# CI time: each launch costs ~10 s of CPU (imports); gate search is killed and resumed in CI by
# tests/stages/test_gate_search.py, long-context shares distill's code path; the campaign runs all four
@pytest.mark.parametrize("name", ["teacher", "distill"])
def test_a_stage_killed_mid_write_resumes_to_the_uninterrupted_outputs(crashed, name):
    _stage, _reference, results = crashed(name)
    for result in results:
        assert result["problems"] == [], result
        assert result["injected"] == len(result["kills"]), f"a kill site was not reached: {result}"


def test_distill_resume_from_an_older_step_replaces_the_newer_one_and_reaches_the_same_outputs(crashed):
    stage, reference, results = crashed("distill")
    assert results[0]["problems"] == []
    run_dir = reference.parent.parent / "trial_0" / "run"  # the first trial's finished run: steps 3 and 4 kept
    older = dataclasses.replace(stage, resume_flag=("--resume-from", "3"))
    done = harness.launch(older, run_dir, run_dir.parent / "resume_from.log")
    assert done.returncode == 0, (run_dir.parent / "resume_from.log").read_text()[-3000:]
    assert harness.compare(stage, reference, run_dir) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["first_step_run"] == 3
    assert summary["resumed"] == {"step": 3, "checkpoint": "step_3", "chosen_by": "--resume-from",
                                  "damaged_skipped": []}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3", "step_4"]  # step_4 replaced
