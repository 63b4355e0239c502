"""Self-describing run directories: resolved config, package versions, checkpoints/, tb/ and log.txt.

Call `prepare_run_dir` on rank 0 only (then barrier); call `setup_file_logging` on every rank. Rank 0 then holds
run.lock for the life of its process, so a second job on the same directory stops at once, naming the holder.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from flashmorph.checkpoint.atomic import list_checkpoints, verify
from flashmorph.errors import CheckpointError, ConfigError, FlashMorphError
from flashmorph.io.atomic import atomic_write_text
from flashmorph.versions import collect_versions

logger = logging.getLogger(__name__)

# every name in a run directory; code asks RunDir(path) for the paths instead of joining these itself
CONFIG_NAME = "config.yaml"
VERSIONS_NAME = "versions.json"
LOG_NAME = "log.txt"
CHECKPOINTS_DIR = "checkpoints"
TB_DIR = "tb"
LOCK_NAME = "run.lock"
SUMMARY_NAME = "summary.json"  # written last by a stage: marks the run finished
GATES_NAME = "gates.safetensors"  # gate search: learned gate values and layer scores
HYBRID_NAME = "hybrid.json"  # the layout tools/discretize_gates.py writes (its --out; the docs put it here)
TEACHER_DIR = "teacher"  # the embedded teacher (model.path null), a HF directory
TEACHER_REPORT_NAME = "teacher_report.json"  # inside a teacher directory: written last, marks the teacher complete
ADAPTER_DIR = "adapter"  # distill with trainable=lora: the LoRA adapter
STUDENT_DIR = "student"  # distill with trainable=linear/full: the hybrid student, a HF directory


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; the one place that knows its file names."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / CONFIG_NAME)
    versions = property(lambda self: self.path / VERSIONS_NAME)
    log = property(lambda self: self.path / LOG_NAME)
    lock = property(lambda self: self.path / LOCK_NAME)
    checkpoints = property(lambda self: self.path / CHECKPOINTS_DIR)
    tb = property(lambda self: self.path / TB_DIR)
    summary = property(lambda self: self.path / SUMMARY_NAME)
    gates = property(lambda self: self.path / GATES_NAME)
    hybrid = property(lambda self: self.path / HYBRID_NAME)
    teacher = property(lambda self: self.path / TEACHER_DIR)
    teacher_report = property(lambda self: self.path / TEACHER_DIR / TEACHER_REPORT_NAME)
    adapter = property(lambda self: self.path / ADAPTER_DIR)
    student = property(lambda self: self.path / STUDENT_DIR)

_held_locks: dict[Path, int] = {}  # run dir -> open fd of its flock'ed run.lock, kept for the process lifetime


def _to_plain(value: Any) -> Any:
    """Turn dataclasses, paths, enums and tuples into the plain types yaml.safe_dump accepts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return _to_plain(value.value)
    return value


def _create_writable_dir(run_dir: Path) -> None:
    fix = "choose another run_dir or fix its permissions"
    if run_dir.exists() and not run_dir.is_dir():
        raise FlashMorphError(f"run_dir {run_dir} exists and is not a directory; {fix}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlashMorphError(f"cannot create run_dir {run_dir} ({e.strerror or e}); {fix}") from e
    try:  # permission bits do not tell the whole story (root, read-only mounts, quotas): try a real write
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise FlashMorphError(f"run_dir {run_dir} is not writable ({e.strerror or e}); {fix}") from e


def _lock_holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text(encoding="utf-8"))
        parts = [f"host {holder['host']}", f"pid {holder['pid']}"]
        if holder.get("slurm_job_id"):
            parts.append(f"SLURM job {holder['slurm_job_id']}")
        return ", ".join(parts) + f", since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def lock_run_dir(run_dir: str | os.PathLike) -> None:
    """Take an exclusive, non-blocking flock on run_dir/run.lock and keep it until this process exits.

    The kernel drops the lock when the holder dies (even by SIGKILL), so a crashed or preempted job never
    blocks its requeued successor. Taking it again in the same process is a no-op. Filesystems without flock
    (e.g. Lustre mounted with noflock) get a warning, not an error.
    """
    run_dir = Path(run_dir).expanduser().absolute()
    if run_dir in _held_locks:
        return
    lock_path = RunDir(run_dir).lock
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FlashMorphError(f"cannot create {lock_path} ({e.strerror or e}); free space or fix the permissions "
                              "there, or choose another run_dir") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FlashMorphError(f"run_dir {run_dir} is in use by another job ({_describe_holder(lock_path)}); wait "
                              "for it to finish or cancel it, or choose another run.run_dir") from None
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            logger.warning("cannot lock %s on this filesystem (%s); make sure no other job uses this run_dir",
                           lock_path, e.strerror or e)
            return
        raise FlashMorphError(f"cannot lock {lock_path} ({e.strerror or e}); choose another run_dir") from e
    _held_locks[run_dir] = fd
    try:  # who holds it, for the message a second job prints; the lock itself does not depend on this
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_lock_holder()) + "\n").encode(), 0)
    except OSError as e:
        logger.warning("could not record the lock holder in %s (%s)", lock_path, e.strerror or e)


def release_run_dir_lock(run_dir: str | os.PathLike) -> None:
    """Give up this process's lock on run_dir (a long-lived process running several stages); no-op if not held."""
    fd = _held_locks.pop(Path(run_dir).expanduser().absolute(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor of the open file releases the flock


def check_resume(path: str | os.PathLike, resume: bool, resume_from: int | None = None) -> None:
    """--resume needs an earlier run's directory: a mistyped run_dir must not quietly start a fresh run.
    --resume-from STEP (implies --resume) needs that step's checkpoint, complete (hashes are checked on resume)."""
    run_dir = Path(path).expanduser()
    resume = resume or resume_from is not None
    if not resume:
        return
    if not run_dir.is_dir():
        raise FlashMorphError(f"--resume: run_dir {run_dir} does not exist, so there is nothing to resume; fix "
                              "run.run_dir, or drop --resume to start a new run")
    checkpoints = RunDir(run_dir).checkpoints
    found = list_checkpoints(checkpoints)
    if resume_from is not None:
        chosen = checkpoints / f"step_{resume_from}"
        if chosen not in found:
            steps = ", ".join(p.name.removeprefix("step_") for p in found) or "none"
            raise CheckpointError(f"--resume-from {resume_from}: {checkpoints} holds no checkpoint of "
                                  f"step {resume_from} (steps there: {steps}); pick one of them, or use --resume")
        try:
            verify(chosen, deep=False)
        except CheckpointError as err:
            raise CheckpointError(f"--resume-from {resume_from}: {err}") from None
        return
    if found and not any(_complete(ckpt) for ckpt in found):  # sizes only here; hashes are checked on resume
        raise CheckpointError(f"--resume: none of the {len(found)} checkpoints in {checkpoints} is "
                              "complete (manifest missing or files truncated), so nothing was loaded or overwritten; "
                              "restore one, or start a new run in another run_dir")


def _complete(ckpt: Path) -> bool:
    try:
        verify(ckpt, deep=False)
    except CheckpointError:
        return False
    return True


def prepare_run_dir(path: str | os.PathLike, config_dict: dict[str, Any], *, resume: bool) -> Path:
    """Create the run dir with checkpoints/ and tb/, write config.yaml and versions.json; return its path.

    Refuses (`FlashMorphError`) a run dir that another live job has locked (see `lock_run_dir`), and one that
    already holds checkpoints unless `resume` is set, so a new run never mixes its checkpoints with an old one's.
    Rank 0 only.
    """
    run_dir = Path(path).expanduser().absolute()
    check_resume(run_dir, resume)
    _create_writable_dir(run_dir)
    lock_run_dir(run_dir)
    has_checkpoints = bool(list_checkpoints(RunDir(run_dir).checkpoints))
    if has_checkpoints and not resume:
        raise FlashMorphError(
            f"run_dir {run_dir} already holds checkpoints; pass --resume to continue or choose a new run_dir"
        )
    if resume and not has_checkpoints:
        logger.info("resume requested but %s holds no checkpoint; starting from scratch", run_dir)

    try:
        config_text = yaml.safe_dump(_to_plain(config_dict), sort_keys=False, default_flow_style=False)
    except yaml.YAMLError as e:
        raise ConfigError(f"resolved config cannot be written as YAML ({e}); config values must be plain data") from e
    config_path = RunDir(run_dir).config
    if resume and config_path.is_file():
        _warn_config_changes(config_path, yaml.safe_load(config_text))

    RunDir(run_dir).checkpoints.mkdir(exist_ok=True)
    RunDir(run_dir).tb.mkdir(exist_ok=True)
    atomic_write_text(config_path, config_text)
    atomic_write_text(RunDir(run_dir).versions, json.dumps(collect_versions(), indent=2) + "\n")
    return run_dir


def _warn_config_changes(old_path: Path, new_config: Any) -> None:
    try:
        old_config = yaml.safe_load(old_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        logger.warning("could not read the previous %s; overwriting it", old_path)
        return
    if old_config == new_config:
        return
    if isinstance(old_config, dict) and isinstance(new_config, dict):
        changed = sorted(k for k in old_config.keys() | new_config.keys() if old_config.get(k) != new_config.get(k))
        logger.warning("resuming with a config that differs from %s in: %s", old_path, ", ".join(changed))
    else:
        logger.warning("resuming with a config that differs from %s", old_path)


class _FlashMorphHandler:
    """Marker mixed into the handlers this module installs, so a second setup call replaces them."""


class _FileHandler(logging.FileHandler, _FlashMorphHandler):
    pass


class _ConsoleHandler(logging.StreamHandler, _FlashMorphHandler):
    pass


def setup_file_logging(run_dir: str | os.PathLike, rank: int, level: int = logging.INFO) -> Path | None:
    """Log to the console on every rank (warnings and up off rank 0) and to run_dir/log.txt on rank 0.

    Installs handlers on the root logger so library warnings land in log.txt too; calling it again
    replaces the handlers it installed before. Returns the log file path on rank 0, else None.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _FlashMorphHandler)]:
        root.removeHandler(handler)
        handler.close()

    prefix = "" if rank == 0 else f"[rank {rank}] "
    console = _ConsoleHandler(sys.stderr)
    console.setLevel(level if rank == 0 else max(level, logging.WARNING))
    console.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(console)

    log_path = None
    if rank == 0:
        log_path = RunDir(run_dir).log
        file_handler = _FileHandler(log_path, mode="a", encoding="utf-8")
        file_handler.setLevel(level)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    return log_path
