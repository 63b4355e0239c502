"""The `deepspeed --hostfile` path: the runner turns a hostfile into world_info and pdsh starts deepspeed's per-node
launcher on every host; here both "hosts" run on this machine. One 2-rank launch, checked from several angles."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flashmorph.model.tiny import build_tiny_model, tiny_config
from slurm_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ds_launcher_worker.py")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    from deepspeed.launcher.runner import encode_world_info, fetch_hostfile, parse_inclusion_exclusion

    tmp = tmp_path_factory.mktemp("hostfile_launch")
    model_dir = tmp / "tiny_llama"
    build_tiny_model(tiny_config("llama", num_layers=2), seed=7).save_pretrained(model_dir)
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    # exactly what `deepspeed --hostfile hostfile` computes before it starts one launcher per host
    world_info = encode_world_info(parse_inclusion_exclusion(fetch_hostfile(str(hostfile)), "", ""))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = [open(tmp / f"node{node}.out", "w") for node in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(WORKER), str(tmp), str(model_dir)],
                              env=env, stdout=logs[node], stderr=subprocess.STDOUT,
                              start_new_session=True)
             for node in (0, 1)]
    try:
        for proc in procs:
            proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
                proc.wait()
        for log in logs:
            log.close()
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp / f"node{node}.out").read_text()[-4000:]
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in (0, 1)], tmp


def test_rank_and_world_come_from_the_launchers_variables(reports):
    (rank0, rank1), _ = reports
    for rank, report in enumerate((rank0, rank1)):
        env = report["env"]
        # node b's only slot is global rank 1: the launcher offsets ranks by the slots of the hosts before it
        assert env["RANK"] == str(rank) and env["CROSS_RANK"] == str(rank)
        assert env["LOCAL_RANK"] == "0" and report["local_rank_arg"] == 0
        assert env["WORLD_SIZE"] == "2" and env["CROSS_SIZE"] == "2" and env["LOCAL_SIZE"] == "1"
        assert report["info"] == {"rank": rank, "world_size": 2, "local_rank": 0}
        assert report["rank_sum"] == 3.0  # 1 + 2: both ranks are in one process group


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(reports):
    (rank0, rank1), _ = reports
    assert rank1["stop"] == {"stopped_at": 2, "received": "SIGTERM"}
    assert rank0["stop"] == {"stopped_at": 2, "received": None}  # never signalled, stopped by the all-reduce


@pytest.mark.parametrize("case", ["rank_write", "manifest"])
def test_full_disk_during_a_checkpoint_is_one_error_on_every_rank(reports, case):
    (rank0, rank1), _ = reports
    failing_rank = 1 if case == "rank_write" else 0
    messages = {rank0["full_disk"][case]["message"], rank1["full_disk"][case]["message"]}
    assert len(messages) == 1, messages  # the same line on both ranks
    (message,) = messages
    assert message is not None and "\n" not in message
    assert "step 4" in message and "No space left on device" in message and "intact" in message
    if case == "rank_write":
        assert f"rank {failing_rank}" in message
    result = rank0["full_disk"][case]
    assert result["left"] == ["step_2"], "the failed save left its staging dir, or a later step, behind"
    assert result["step_2"] == "intact"  # the earlier checkpoint still passes a deep (sha256) verify
    assert not result["gates_written"]
