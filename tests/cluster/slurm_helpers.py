"""A fake SLURM allocation on this machine: `srun` / `scontrol` shims on PATH and the variables sbatch sets.

The srun shim starts one task per fake node as a local process, forwards USR1 to the tasks, turns a TERM into
SIGKILL and kills the step when a task fails (--kill-on-bad-exit), as Slurm's srun does; `scontrol requeue` is
recorded in a file instead of requeueing anything.
"""

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SRUN = r"""#!/bin/bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done   # srun options; the template passes only --opt=value and flags
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null || true' USR1
trap 'kill -KILL "${pids[@]}" 2>/dev/null || true' TERM
rc=0
live=("${pids[@]}")
while ((${#live[@]})); do
    next=()
    for pid in "${live[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then next+=("$pid"); continue; fi
        r=0
        wait "$pid" || r=$?
        if ((r != 0)); then
            ((rc == 0)) && rc=$r
            kill -KILL "${pids[@]}" 2>/dev/null || true   # --kill-on-bad-exit=1: one failed task ends the step
        fi
    done
    live=("${next[@]+"${next[@]}"}")
    ((${#live[@]})) && sleep 0.1
done
exit "$rc"
"""

SCONTROL = r"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then
    for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do echo 127.0.0.1; done
elif [[ $1 == requeue ]]; then
    echo "requeue $2" >> "$FAKE_SLURM_LOG"
else
    echo "fake scontrol: unsupported: $*" >&2
    exit 1
fi
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_slurm_env(tmp_path: Path, nodes: int, job_id: int = 4242, restart_count: int = 0) -> dict[str, str]:
    """Environment of a batch script in a `nodes`-node allocation whose srun/scontrol are the shims."""
    shims = tmp_path / "fake_slurm_bin"
    shims.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    # the interpreter's own bin dir first: torchrun there, not a version-manager shim that re-resolves it
    path = os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="fake", SLURM_JOB_NUM_NODES=str(nodes),
                SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=f"fake[0-{nodes - 1}]", SLURM_SUBMIT_DIR=str(ROOT),
                SLURM_RESTART_COUNT=str(restart_count), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
                FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"), PYTHONUNBUFFERED="1")
