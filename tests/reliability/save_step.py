"""One checkpoint save the way the teacher does it (staging, atomic files, seal, prune), runnable as a subprocess
that FLASHMORPH_FAULT_KILL_AT can kill: `python save_step.py ROOT STEP`."""

import sys
from pathlib import Path

from flashmorph.checkpoint import atomic
from flashmorph.io.atomic import atomic_write_text

KEEP_LAST = 2


def save(root: Path, step: int) -> Path:
    staging = atomic.prepare_staging(root, step)
    for name in ("model", "optimizer"):  # two files: a kill can fall between them
        atomic_write_text(staging / f"{name}.txt", f"{name} at step {step}")
    final = atomic.finalize(root, step, {"step": step})
    atomic.prune(root, keep_last=KEEP_LAST)
    return final


if __name__ == "__main__":
    save(Path(sys.argv[1]), int(sys.argv[2]))
