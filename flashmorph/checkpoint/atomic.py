"""Atomic, verified checkpoint directories (`checkpoints/step_N/` with a manifest); single files: flashmorph.io.atomic.

A checkpoint is written into `checkpoints/.tmp-step_N/` by any number of ranks, then rank 0 hashes every
file into `manifest.json` and renames the directory to `step_N`: a `step_N` directory either is complete
or does not exist. Collectives are the caller's job (flashmorph/parallel/); nothing here talks to ranks.

Typical use, with barriers done by the caller:

    if rank == 0: prepare_staging(root, step)
    barrier()
    engine.save_checkpoint(staging_dir(root, step), tag="ds")      # every rank writes its files
    barrier()
    if rank == 0: finalize(root, step, {"tokens_seen": n}); prune(root, keep_last=3)
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flashmorph import __version__
from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.io.atomic import (
    fault_point,
    fsync_dir,
    hash_and_fsync,
    is_storage_error,
    sha256_file,
    storage_error,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(0|[1-9][0-9]*)$")
_STAGING_PREFIX = ".tmp-"
_REPLACED_PREFIX = ".old-"  # a step_N being replaced, moved aside until the new one is in place
_DELETING_PREFIX = ".del-"  # a pruned step_N, moved aside so a crash mid-delete leaves no half step_N
_HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL, so threads overlap I/O and hashing


# ----------------------------------------------------------------------------------------------------------
# Paths


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return step


def checkpoint_dir(checkpoints_root: str | os.PathLike, step: int) -> Path:
    """The final directory of step `step`: `checkpoints_root/step_N`."""
    return Path(checkpoints_root) / f"step_{_check_step(step)}"


def staging_dir(checkpoints_root: str | os.PathLike, step: int) -> Path:
    """The directory every rank writes step `step` into before `finalize`: `checkpoints_root/.tmp-step_N`."""
    return Path(checkpoints_root) / f"{_STAGING_PREFIX}step_{_check_step(step)}"


def checkpoint_step(ckpt_dir: str | os.PathLike) -> int:
    """The step N of a `step_N` directory."""
    match = _STEP_DIR.match(Path(ckpt_dir).name)
    if match is None:
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint directory (expected a name like step_123)")
    return int(match.group(1))


# ----------------------------------------------------------------------------------------------------------
# Checkpoint directories


def prepare_staging(checkpoints_root: str | os.PathLike, step: int) -> Path:
    """Create an empty staging dir for `step`, removing a stale one left by a crashed run (rank 0 only)."""
    staging = staging_dir(checkpoints_root, step)
    try:
        if staging.exists():
            logger.warning("removing stale %s left by an interrupted save", staging)
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    except OSError as e:
        if is_storage_error(e):
            raise storage_error(e, f"checkpoint step {step}", staging,
                                "earlier checkpoints are intact") from e
        raise
    fsync_dir(staging.parent)
    fault_point("staging")
    return staging


def discard_staging(checkpoints_root: str | os.PathLike, step: int) -> None:
    """Remove the staging dir of a save that failed (rank 0 only), so nothing half-written is left behind."""
    staging = staging_dir(checkpoints_root, step)
    shutil.rmtree(staging, ignore_errors=True)
    if staging.exists():
        logger.warning("could not remove %s; it is ignored on resume and removed by the next save of step %d",
                       staging, step)


def _list_files(directory: Path) -> list[str]:
    """Every regular file under `directory`, as sorted POSIX paths relative to it."""
    files = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            files.append((Path(dirpath) / name).relative_to(directory).as_posix())
    return sorted(files)


def finalize(checkpoints_root: str | os.PathLike, step: int, extra_meta: dict[str, Any] | None = None) -> Path:
    """Seal the staging dir of `step` into `step_N` (rank 0 only, after every rank wrote its files).

    Writes `manifest.json` (every file's relative path, size and sha256, plus `extra_meta`), fsyncs files
    and directories, then renames the staging dir to `step_N`. An existing `step_N` is replaced: it is
    moved aside, the new one renamed in, then the old one deleted, so a crash never leaves no valid copy.
    """
    root = Path(checkpoints_root)
    staging = staging_dir(root, step)
    if not staging.is_dir():
        raise CheckpointError(f"staging dir {staging} does not exist; call prepare_staging before writing step {step}")
    return seal_directory(staging, checkpoint_dir(root, step), extra_meta, step=step)


def seal_directory(staging: str | os.PathLike, final: str | os.PathLike, extra_meta: dict[str, Any] | None = None,
                   *, step: int | None = None) -> Path:
    """`finalize` for any directory name: hash `staging` into its manifest, then rename it to `final`.

    Used directly by outputs that are not `step_N` checkpoints (e.g. resharded weights); `final` is replaced
    the same crash-safe way. The manifest's `step` is None there.
    """
    staging, final = Path(staging), Path(final)
    root = final.parent
    what = f"step {step}" if step is not None else final.name
    meta_json = json.dumps(extra_meta or {})  # fail on unserialisable meta before touching anything

    rel_paths = [p for p in _list_files(staging) if p != MANIFEST_NAME]
    if not rel_paths:
        raise CheckpointError(f"staging dir {staging} is empty; no rank wrote {what}")
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        results = list(pool.map(lambda rel: hash_and_fsync(staging / rel), rel_paths))
    fault_point("sealing")
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "flashmorph_version": __version__,
        "created_unix": time.time(),
        "meta": json.loads(meta_json),
        "files": [{"path": rel, "size": size, "sha256": digest} for rel, (size, digest) in zip(rel_paths, results)],
    }
    manifest_path = staging / MANIFEST_NAME
    try:
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if not is_storage_error(e):
            raise
        shutil.rmtree(staging, ignore_errors=True)  # never leave a staging dir that looks nearly sealed
        raise storage_error(e, f"the manifest of {what}", staging,
                            f"{final.name} was not written; earlier checkpoints are intact") from e
    for dirpath, _dirnames, _filenames in os.walk(staging, topdown=False):
        fsync_dir(Path(dirpath))
    fault_point("manifest")

    aside = root / f"{_REPLACED_PREFIX}{final.name}"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)  # left by a crash during an earlier replace of this same directory
        logger.warning("replacing existing checkpoint %s", final)
        os.rename(final, aside)
        fault_point("replace")
        os.rename(staging, final)
        fsync_dir(root)
    else:
        os.rename(staging, final)
    fsync_dir(root)
    fault_point("sealed")
    if aside.exists():  # the copy moved aside, or the one a crash between the two renames left: final was then
        shutil.rmtree(aside)  # absent, so the run resumed from an earlier step and sealed this one again
    logger.info("saved checkpoint %s (%d files, %d bytes)", final, len(rel_paths), sum(s for s, _ in results))
    return final


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `manifest.json` of a checkpoint; `CheckpointError` if it is missing or unreadable."""
    ckpt_dir = Path(ckpt_dir)
    fix = "delete it or resume from an earlier step"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist or is not a directory")
    manifest_path = ckpt_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"incomplete checkpoint {ckpt_dir} (no {MANIFEST_NAME}); {fix}", file=MANIFEST_NAME)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        fmt = manifest["format"]
        for entry in manifest["files"]:
            rel = entry["path"]
            if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"file path {rel!r} escapes the checkpoint")
            int(entry["size"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"incomplete checkpoint {ckpt_dir} ({MANIFEST_NAME} is unreadable: {e!r}); {fix}") from e
    if fmt != MANIFEST_FORMAT:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has manifest format {fmt!r}, this flashmorph reads {MANIFEST_FORMAT}; "
            "use the flashmorph version that wrote it"
        )
    return manifest


def verify(ckpt_dir: str | os.PathLike, deep: bool = True, allow_extra: Iterable[str] = ()) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return the manifest, or raise a one-line `CheckpointError`.

    Checks that every listed file exists with its recorded size, that no unlisted file is present (unless
    its relative path matches a glob in `allow_extra`), and with `deep=True` that every sha256 matches.
    """
    ckpt_dir = Path(ckpt_dir)
    fix = "delete it or resume from an earlier step"
    manifest = read_manifest(ckpt_dir)
    entries = manifest["files"]
    for entry in entries:
        path = ckpt_dir / entry["path"]
        if not path.is_file():
            raise CheckpointError(f"incomplete checkpoint {ckpt_dir}: {entry['path']} is missing; {fix}", file=entry["path"])
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"corrupted checkpoint {ckpt_dir}: {entry['path']} is {size} bytes, "
                f"manifest says {entry['size']} (truncated?); {fix}", file=entry["path"]
            )
    listed = {entry["path"] for entry in entries} | {MANIFEST_NAME}
    patterns = list(allow_extra)
    for rel in _list_files(ckpt_dir):
        if rel not in listed and not any(fnmatch.fnmatchcase(rel, pat) for pat in patterns):
            raise CheckpointError(
                f"checkpoint {ckpt_dir} holds {rel}, which {MANIFEST_NAME} does not list; "
                "remove it or pass it in allow_extra", file=rel
            )
    if deep:
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            digests = list(pool.map(lambda e: sha256_file(ckpt_dir / e["path"]), entries))
        for entry, digest in zip(entries, digests):
            if digest != entry["sha256"]:
                raise CheckpointError(
                    f"corrupted checkpoint {ckpt_dir}: sha256 of {entry['path']} does not match {MANIFEST_NAME}; {fix}",
                    file=entry["path"])
    return manifest


def list_checkpoints(checkpoints_root: str | os.PathLike) -> list[Path]:
    """Every `step_N` directory under `checkpoints_root`, sorted by step (staging and hidden dirs excluded)."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def latest_complete(checkpoints_root: str | os.PathLike, allow_extra: Iterable[str] = ()) -> Path | None:
    """The highest-step checkpoint that passes a shallow `verify` (sizes); broken ones are skipped, not deleted."""
    allow_extra = list(allow_extra)
    for ckpt in reversed(list_checkpoints(checkpoints_root)):
        try:
            verify(ckpt, deep=False, allow_extra=allow_extra)
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
            continue
        return ckpt
    return None


def prune(checkpoints_root: str | os.PathLike, keep_last: int, allow_extra: Iterable[str] = ()) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` complete ones (rank 0 only).

    Never touches staging dirs (a live save may be writing them) nor checkpoints that fail verification
    (left for a human to inspect); the newest complete checkpoint is always kept. Returns the deleted paths.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ConfigError(f"keep_last must be an int >= 1 (got {keep_last!r}); set checkpoint keep_last to 1 or more")
    root = Path(checkpoints_root)
    allow_extra = list(allow_extra)
    complete = []
    for ckpt in list_checkpoints(root):
        try:
            verify(ckpt, deep=False, allow_extra=allow_extra)
        except CheckpointError:
            continue
        complete.append(ckpt)
    for doomed in root.glob(f"{_DELETING_PREFIX}step_*"):  # deletions a crash interrupted (only prune makes these)
        shutil.rmtree(doomed)
    deleted = []
    for ckpt in complete[:-keep_last]:
        doomed = root / f"{_DELETING_PREFIX}{ckpt.name}"
        os.rename(ckpt, doomed)
        fsync_dir(root)
        fault_point("prune")
        shutil.rmtree(doomed)
        deleted.append(ckpt)
        logger.info("pruned checkpoint %s", ckpt)
    return deleted
