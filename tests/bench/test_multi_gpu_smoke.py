"""bench/multi_gpu.sh in its smoke mode: one torchrun launch of bench.multi_gpu with 2 gloo ranks on CPU (tiny
shapes), through the same launch, time-limit and summary code the GPU run uses; every step's checks must pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_gpu")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC="2")
    env.pop("MULTI_GPU_ARGS", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "multi_gpu.sh"), "smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke: nccl, gate, sp, tp: exit 0" in proc.stdout, proc.stdout[-3000:]
    return out


def load(out: Path, name: str) -> dict:
    data = json.loads((out / f"multi_gpu_{name}.json").read_text())
    assert data["complete"] is True and "in_progress" not in data
    assert data["world"]["size"] == 2 and data["world"]["backend"] == "gloo"
    assert data["environment"]["command"].startswith("torchrun --standalone --nproc_per_node 2 -m bench.multi_gpu")
    return data


def rows(data: dict, kind: str) -> list[dict]:
    return [row for row in data["rows"] if row["kind"] == kind]


def test_collectives_are_exact_and_timed(smoke_run):
    data = load(smoke_run, "1_nccl")
    check = rows(data, "correctness")[0]
    assert check["all_reduce_max_error_per_rank"] == [0.0, 0.0]
    assert check["all_to_all_max_error_per_rank"] == [0.0, 0.0]
    bandwidth = {row["op"]: row for row in rows(data, "bandwidth")}
    assert set(bandwidth) == {"all_reduce", "all_to_all"}
    assert all(row["busbw_gb_s"] > 0 and row["bytes"] == 2**20 for row in bandwidth.values())
    assert [r["met"] for r in data["ratios"][:2]] == ["yes", "yes"]


def test_gate_search_under_zero3_matches_one_process_and_moves_the_gates(smoke_run):
    data = load(smoke_run, "2_gate_search")
    grad = rows(data, "gate_grad_check")[0]
    # the ranks read different samples, so ZeRO's averaged gradient is a real reduction, not a copy
    assert grad["max_abs_single"] > 0
    assert grad["relative_max_difference"] < 1e-5
    step = rows(data, "gate_search")[0]
    assert step["length"] == 128 and step["steps"] == 3 and len(step["gate_values_per_step"]) == 3
    first, last = step["gate_values_per_step"][0], step["gate_values_per_step"][-1]
    assert first == pytest.approx([0.88] * 4) and all(b < a for a, b in zip(first, last))  # the mean-gate penalty
    gates = rows(data, "gates")[0]
    assert gates["max_abs_difference"] == 0 and len(gates["gate_logits_per_rank"]) == 2
    # the estimator sits beside each run, for 1 GPU and for the world; peaks are not invented on CPU
    assert set(step["estimate_allocated_bytes"]) == {"1", "2"} and step["peak_bytes_per_rank"] == [None, None]
    assert all(r["met"] in ("yes", "-") for r in data["ratios"])


def test_sequence_parallel_loss_equals_the_unsharded_loss_and_trains_at_each_length(smoke_run):
    data = load(smoke_run, "3_sequence_parallel")
    check = rows(data, "loss_check")[0]
    assert check["kl_per_token_sp"] > 0
    assert check["kl_per_token_whole_per_rank"][0] == check["kl_per_token_whole_per_rank"][1]
    assert check["relative_difference"] < 1e-4
    steps = rows(data, "sp_distill")
    assert [row["length"] for row in steps] == [64, 128]
    # a warm-up and a timed step at the first length; later lengths need no warm-up (nothing retunes for a length)
    assert [len(row["step_times_s"]) for row in steps] == [2, 1] and all(row["tokens_per_s"] > 0 for row in steps)
    assert all(row["estimate"]["tokens_per_step"] == row["length"] for row in steps)
    assert len(rows(data, "sp_step")) == 3  # one row per step, written as it finishes
    assert rows(data, "build")[0]["sp"] == 2 and rows(data, "build")[0]["lora_params"] > 0


def test_tensor_parallel_first_step_equals_the_unsplit_model(smoke_run):
    data = load(smoke_run, "4_tensor_parallel")
    step = rows(data, "tp_distill")[0]
    for rank in step["first_step_per_rank"]:
        assert rank["kl_tp1"] > 0 and rank["grad_norm_tp1"] > 0
    assert step["kl_relative_difference"] < 1e-4 and step["grad_norm_relative_difference"] < 1e-4
    assert step["tokens_per_s"] > 0 and len(step["kl_per_step"]) == 3
    assert rows(data, "build")[0]["tp"] == 2
    assert [r["met"] for r in data["ratios"][:2]] == ["yes", "yes"]


def test_markdown_summary_holds_every_step(smoke_run):
    text = (smoke_run / "multi_gpu.md").read_text()
    for title in ("collectives and bandwidth", "gate search under ZeRO-3", "Ulysses sequence parallelism",
                  "megatron tensor parallelism"):
        assert title in text
    assert "INCOMPLETE" not in text and "not run" not in text
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    assert all(line.count("|") == 6 for line in table)  # no stray pipes splitting a row's columns
