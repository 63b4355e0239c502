"""Run launcher/gate_search.py as a user would: a subprocess on the tiny recipe, two steps, a checkpoint per step."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "embedded.yaml"


def gate_search_cli(model_dir: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [f"model.path={model_dir}", f"run.run_dir={run_dir}", "search.steps=2", "search.save_every=1",
                 "search.keep_last=0", "search.micro_batch_size=2", "data.seq_len=34"]
    argv = [sys.executable, str(ROOT / "launcher" / "gate_search.py"), "--config", str(RECIPE), "--no-progress",
            *[a for item in overrides for a in ("--override", item)], *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
