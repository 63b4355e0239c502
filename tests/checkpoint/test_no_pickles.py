"""No code from disk: a pickle planted in a run directory (its manifest rewritten to match, as anyone who can write
the directory can do) is refused on --resume and by reshard, and never runs; real checkpoints hold no scripts."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from flashmorph.checkpoint import atomic
from flashmorph.checkpoint.reshard.zero3 import check_rank_files, rank_files
from flashmorph.errors import CheckpointError
from flashmorph.io.safe_load import check_pickles, weights_only_loads
from helpers.gate_search_cli import gate_search_cli as _gate_search

MODEL_STATES = "state/zero_pp_rank_0_mp_rank_00_model_states.pt"


class _Payload:
    """Unpickling this runs `exec`, which creates the marker file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _plant(ckpt: Path, rel: str, marker: Path) -> None:
    """Replace one file with a code-running pickle and rewrite the manifest's entry, so size and hash checks pass."""
    torch.save({"module": {}, "step": 2, "payload": _Payload(marker)}, ckpt / rel)
    manifest = json.loads((ckpt / atomic.MANIFEST_NAME).read_text())
    data = (ckpt / rel).read_bytes()
    for entry in manifest["files"]:
        if entry["path"] == rel:
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (ckpt / atomic.MANIFEST_NAME).write_text(json.dumps(manifest))
    atomic.verify(ckpt)  # the tampering is invisible to the manifest


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run / "run", run_dir)
    return run_dir


def test_checkpoints_hold_no_scripts_and_only_allow_listed_types(finished_run):
    checkpoints = atomic.list_checkpoints(finished_run / "run" / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_1", "step_2"]
    for ckpt in checkpoints:
        assert not list(ckpt.rglob("*.py"))  # DeepSpeed's zero_to_fp32.py / zero_to_torch.py are not shipped
        check_pickles(ckpt)  # DeepSpeed's real files pass the allow-list


def test_a_planted_pickle_in_every_checkpoint_is_refused_on_resume_and_never_runs(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "code_ran"
    for ckpt in atomic.list_checkpoints(run_dir / "checkpoints"):
        _plant(ckpt, MODEL_STATES, marker)
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    done = _gate_search(finished_run / "model", run_dir, "--resume", "--override", "search.steps=3")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none of the 2 checkpoints") and "asks for builtins.exec" in last, last
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()} == before


def test_a_planted_pickle_in_the_newest_checkpoint_falls_back_to_the_intact_one(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "code_ran"
    _plant(run_dir / "checkpoints" / "step_2", MODEL_STATES, marker)
    done = _gate_search(finished_run / "model", run_dir, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping damaged checkpoint" in done.stderr and "asks for builtins.exec" in done.stderr
    assert "resuming from step 1" in done.stderr and "the newest intact checkpoint" in done.stderr
    assert not marker.exists()
    check_pickles(run_dir / "checkpoints" / "step_2")  # step 2 was run again and re-saved clean


def test_reshard_refuses_a_planted_pickle_by_name(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "code_ran"
    ckpt = run_dir / "checkpoints" / "step_1"
    _plant(ckpt, MODEL_STATES, marker)
    with pytest.raises(CheckpointError, match=r"model_states\.pt holds a pickle that asks for builtins\.exec") as err:
        check_rank_files(rank_files(ckpt, "state"))
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_weights_only_is_forced_even_where_deepspeed_asks_for_pickle(tmp_path, monkeypatch):
    """The second line of defence, under DeepSpeed's own loads: weights_only=False is overridden inside the block,
    even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set, and the environment is restored afterwards."""
    marker = tmp_path / "code_ran"
    torch.save({"payload": _Payload(marker)}, tmp_path / "evil.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="Weights only load failed"):
        with weights_only_loads():
            torch.load(tmp_path / "evil.pt", weights_only=False)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


class _EnumByGetattr:
    """How Python 3.11.2 pickles an int-valued Enum member: getattr(ZeroStageEnum, "weights")."""

    def __reduce__(self):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        return getattr, (ZeroStageEnum, "weights")


class _CallFetchedMethod:
    """getattr (allow-listed for the enum form above) fetching a callable of an allowed type, then calling it."""

    def __reduce__(self):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        return getattr(ZeroStageEnum, "_missing_"), (3,)


def test_an_enum_pickled_through_getattr_loads_but_a_fetched_callable_never_runs(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"stage": _EnumByGetattr(), "t": torch.ones(2)}, tmp_path / "enum.pt")
    check_pickles(tmp_path)  # the scan accepts the enum form
    with weights_only_loads():
        assert torch.load(tmp_path / "enum.pt")["stage"] is ZeroStageEnum.weights
    torch.save({"x": _CallFetchedMethod()}, tmp_path / "evil.pt")
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "evil.pt")
