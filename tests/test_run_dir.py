"""Run directories: refusal to clobber checkpoints, config.yaml / versions.json, writability, logging."""

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import yaml

import flashmorph
from flashmorph.checkpoint.atomic import finalize, prepare_staging
from flashmorph.errors import FlashMorphError
from flashmorph.run_dir import RunDir, prepare_run_dir, setup_file_logging

CONFIG = {"stage": "gate_search", "model": {"path": "/models/llama", "layers": 4}, "lr": 0.05, "seq_lens": [512, 1024]}


def add_checkpoint(run_dir, step=1):
    staging = prepare_staging(run_dir / "checkpoints", step)
    (staging / "gates.safetensors").write_bytes(b"data")
    finalize(run_dir / "checkpoints", step, {})


def test_creates_layout_config_and_versions(tmp_path):
    run_dir = prepare_run_dir(tmp_path / "runs" / "a", CONFIG, resume=False)
    assert run_dir == tmp_path / "runs" / "a"
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "tb").is_dir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == CONFIG
    assert (run_dir / "config.yaml").read_text().startswith("stage:")  # key order kept
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["flashmorph"] == flashmorph.__version__
    for key in ("python", "torch", "transformers", "deepspeed", "fla", "megatron-core", "datasets"):
        assert isinstance(versions[key], str) and versions[key]
    assert "flashmorph_git_commit" in versions
    assert versions["flashmorph_git_commit"] is None or len(versions["flashmorph_git_commit"]) == 40
    assert "hostname" not in versions and os.uname().nodename not in json.dumps(versions)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp or probe files left


def test_run_dir_names_every_file_of_a_run(tmp_path):
    run = RunDir(str(tmp_path))  # a str is taken as a path
    assert run.path == tmp_path
    assert {name: getattr(run, name).relative_to(tmp_path).as_posix() for name in (
        "config", "versions", "log", "lock", "checkpoints", "tb", "summary", "gates", "hybrid", "teacher",
        "teacher_report", "adapter", "student")} == {
        "config": "config.yaml", "versions": "versions.json", "log": "log.txt", "lock": "run.lock",
        "checkpoints": "checkpoints", "tb": "tb", "summary": "summary.json", "gates": "gates.safetensors",
        "hybrid": "hybrid.json", "teacher": "teacher", "teacher_report": "teacher/teacher_report.json",
        "adapter": "adapter", "student": "student"}
    run_dir = prepare_run_dir(tmp_path / "a", CONFIG, resume=False)
    written = RunDir(run_dir)
    assert written.config.is_file() and written.versions.is_file()
    assert written.checkpoints.is_dir() and written.tb.is_dir()


def test_config_dataclasses_and_paths_become_plain_yaml(tmp_path):
    @dataclasses.dataclass
    class Model:
        path: Path = Path("/models/x")
        dims: tuple = (1, 2)

    run_dir = prepare_run_dir(tmp_path / "r", {"model": Model()}, resume=False)
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {"model": {"path": "/models/x", "dims": [1, 2]}}


def test_refuses_existing_checkpoints_without_resume(tmp_path):
    run_dir = prepare_run_dir(tmp_path / "r", CONFIG, resume=False)
    prepare_run_dir(run_dir, CONFIG, resume=False)  # no checkpoints yet: rerunning is fine
    add_checkpoint(run_dir)
    with pytest.raises(FlashMorphError, match=r"already holds checkpoints; pass --resume to continue"):
        prepare_run_dir(run_dir, CONFIG, resume=False)
    assert (run_dir / "checkpoints" / "step_1").is_dir()


def test_resume_keeps_checkpoints_and_warns_on_config_change(tmp_path, caplog):
    run_dir = prepare_run_dir(tmp_path / "r", CONFIG, resume=False)
    add_checkpoint(run_dir)
    changed = {**CONFIG, "lr": 0.01}
    with caplog.at_level(logging.WARNING, logger="flashmorph.run_dir"):
        prepare_run_dir(run_dir, changed, resume=True)
    assert "differs" in caplog.text and "lr" in caplog.text
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == 0.01
    assert (run_dir / "checkpoints" / "step_1" / "manifest.json").is_file()


def test_unwritable_run_dir_gives_one_line_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: a path under a regular file can never be created
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        target = blocker / "run"
        match = r"cannot create run_dir .*a_file/run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked
        match = r"run_dir .*locked is not writable"
    try:
        with pytest.raises(FlashMorphError, match=match) as info:
            prepare_run_dir(target, CONFIG, resume=False)
        assert "\n" not in str(info.value)
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)


def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("x")
    with pytest.raises(FlashMorphError, match="exists and is not a directory"):
        prepare_run_dir(path, CONFIG, resume=False)


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def _ours(root):
    from flashmorph.run_dir import _FlashMorphHandler

    return [h for h in root.handlers if isinstance(h, _FlashMorphHandler)]


def test_file_logging_rank0_idempotent(tmp_path, restore_root_logger):
    log_path = setup_file_logging(tmp_path, rank=0)
    assert setup_file_logging(tmp_path, rank=0) == log_path == tmp_path / "log.txt"
    assert len(_ours(logging.getLogger())) == 2  # one console + one file handler, not doubled
    logging.getLogger("flashmorph.test").info("hello from rank 0")
    for handler in _ours(logging.getLogger()):
        handler.flush()
    assert log_path.read_text().count("hello from rank 0") == 1


def test_file_logging_other_ranks_write_no_file(tmp_path, restore_root_logger):
    assert setup_file_logging(tmp_path, rank=1) is None
    logging.getLogger("flashmorph.test").warning("from rank 1")
    assert not (tmp_path / "log.txt").exists()
    (console,) = _ours(logging.getLogger())
    assert console.level == logging.WARNING


def test_git_commit_recorded_only_for_a_checkout_of_flashmorph(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from flashmorph import versions

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    src = tmp_path / "src"
    (src / "flashmorph").mkdir(parents=True)
    (src / "flashmorph" / "__init__.py").write_text("")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    monkeypatch.setattr(flashmorph, "__file__", str(src / "flashmorph" / "__init__.py"))
    assert versions._flashmorph_git_commit() == (head, False)
    (src / "flashmorph" / "__init__.py").write_text("x = 1\n")
    assert versions._flashmorph_git_commit() == (head, True)

    # a copy installed somewhere inside another repository (e.g. a venv) must not report that repository
    nested = src / "venv" / "site-packages" / "flashmorph"
    nested.mkdir(parents=True)
    monkeypatch.setattr(flashmorph, "__file__", str(nested / "__init__.py"))
    assert versions._flashmorph_git_commit() == (None, None)
