"""A quiet, honest console: third-party noise is filtered narrowly, and the embedded main job prints only our lines."""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from flashmorph.parallel.quiet import drop_stdout_lines, quiet_third_party

ROOT = Path(__file__).resolve().parents[2]
DEPRECATED = "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.x` instead."


def _warn(message, category, module):
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)


def test_only_the_listed_third_party_warnings_are_filtered():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # a second call adds nothing
        _warn(DEPRECATED, FutureWarning, "torch.distributed.c10d_logger")  # DeepSpeed's call: filtered
        _warn("Transformer Engine and Apex are not installed. Falling back", UserWarning, "megatron.core.optimizer")
        _warn("`torch.distributed.broadcast` is deprecated", FutureWarning, "torch.distributed.c10d_logger")  # other
        _warn(DEPRECATED, FutureWarning, "flashmorph.parallel.zero")  # our own deprecated call stays visible
        _warn(DEPRECATED, UserWarning, "torch.distributed.c10d_logger")  # another category
    assert [(str(w.message)[:40], w.category) for w in caught] == [
        ("`torch.distributed.broadcast` is depreca", FutureWarning),
        (DEPRECATED[:40], FutureWarning),
        (DEPRECATED[:40], UserWarning),
    ]


def test_only_the_listed_log_records_and_stdout_lines_are_dropped(caplog, capsys):
    quiet_third_party()
    quiet_third_party()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    assert sum(type(f).__name__ == "_DropMessages" for f in deepspeed_logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="DeepSpeed"):
        deepspeed_logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable")
        deepspeed_logger.warning("ZeRO-3 partitioning failed")
    assert [r.getMessage() for r in caplog.records] == ["ZeRO-3 partitioning failed"]

    with drop_stdout_lines():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("anything else")
    assert capsys.readouterr().out == "anything else\n"


# a line of ours: a progress bar, a log record of a flashmorph logger, or the summary printed at the end
_PROGRESS = re.compile(r"^(teacher|gate search): +\d+%")
_OUR_LOG = re.compile(r"^\d\d:\d\d:\d\d [DIWEC] flashmorph\.")
_THIRD_PARTY_WARNING = re.compile(r"site-packages|dist-packages|\w+Warning: |\[WARNING\]|^W\d{4} ")


def test_the_embedded_main_job_prints_only_our_lines(tmp_path):
    """The README's main job, shrunk (a 20-step teacher, 3 gate-search steps), with its progress bars on: every
    line on stdout/stderr is ours; no third-party warning shows."""
    overrides = [f"run.run_dir={tmp_path / 'run'}", "teacher.curriculum=[2]", "teacher.max_steps_per_stage=20",
                 "teacher.eval_samples=64", "teacher.require_complete=false", "search.steps=3", "search.save_every=0"]
    cmd = [sys.executable, str(ROOT / "launcher" / "gate_search.py"), "--config", str(ROOT / "recipes" / "embedded.yaml")]
    for item in overrides:
        cmd += ["--override", item]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + "\n" + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    summary = proc.stdout.split("gate search summary", 1)
    assert len(summary) == 2, proc.stdout[-2000:]
    lines = [line.strip() for line in re.split(r"[\r\n]", summary[0] + "\n" + proc.stderr) if line.strip()]
    noise = [line for line in lines if _THIRD_PARTY_WARNING.search(line)]
    assert not noise, "third-party warnings on the console:\n" + "\n".join(noise[:20])
    foreign = [line for line in lines if not (_PROGRESS.match(line) or _OUR_LOG.match(line))]
    assert not foreign, "lines that are not ours on the console:\n" + "\n".join(foreign[:20])
