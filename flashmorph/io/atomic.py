"""Atomic single-file writes (config.yaml, gates.safetensors, ...) and the storage errors they raise.

Readers see the old file or the new one, never a partial one: every write goes to a temp file next to the target,
is fsynced and renamed over it. Generic file io, used by every layer; checkpoint directories build on it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flashmorph.errors import CheckpointError

logger = logging.getLogger(__name__)

_HASH_CHUNK = 8 << 20
# errnos that mean "this filesystem will not take the write": reported as one CheckpointError, never a traceback
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_STORAGE_FIX = "free space there, fix its permissions, or point run.run_dir at another filesystem"

# ----------------------------------------------------------------------------------------------------------
# Crash testing (tests/reliability): FLASHMORPH_FAULT_KILL_AT=<site>:<n> SIGKILLs this process the n-th time it
# passes `site`, so a test can die exactly between two steps of a save, which a timed kill rarely hits.
# Read once at import; unset (always, outside tests) each site costs one comparison.

FAULT_ENV = "FLASHMORPH_FAULT_KILL_AT"
FAULT_SITES = (
    "file_tmp",      # a single file written to its temp name, not yet renamed over the target
    "file_renamed",  # ... renamed over the target, its directory not yet fsynced
    "staging",       # a checkpoint's empty staging dir created, no rank has written into it
    "sealing",       # every file of the staging dir written and hashed, manifest.json not yet written
    "manifest",      # manifest.json written, the staging dir not yet renamed to step_N
    "replace",       # an existing step_N moved aside, the new one not yet renamed in
    "sealed",        # step_N renamed into place, older checkpoints not yet pruned
    "prune",         # an old checkpoint renamed to .del-step_N, not yet deleted
)


def _parse_fault(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    site, _, count = value.partition(":")
    if site not in FAULT_SITES or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected <site>:<n> with n >= 1 and site one of {FAULT_SITES}")
    return site, int(count)


_FAULT = _parse_fault(os.environ.get(FAULT_ENV))
_fault_hits = 0


def fault_point(site: str) -> None:
    """SIGKILL this process at the n-th pass of `site` when FLASHMORPH_FAULT_KILL_AT=<site>:<n> (crash tests)."""
    global _fault_hits
    if _FAULT is None or _FAULT[0] != site:
        return
    _fault_hits += 1
    if _fault_hits == _FAULT[1]:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

# ----------------------------------------------------------------------------------------------------------
# Storage failures


def is_storage_error(err: BaseException) -> bool:
    """A write refused by the filesystem: full disk or quota, read-only, permission denied."""
    return isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS


def _free_space(path: Path) -> str:
    for candidate in (path, *path.parents):  # the path itself may be what could not be created
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if free < 1024 or unit == "TiB":
                return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
            free /= 1024
    return "unknown space"


def storage_error(err: BaseException, what: str, path: str | os.PathLike, outcome: str = "") -> CheckpointError:
    """One line for a failed write of `what` at `path`: the reason, the free space left there, the fix, `outcome`."""
    path = Path(path)
    if isinstance(err, OSError) and err.errno is not None:
        reason = err.strerror or os.strerror(err.errno)
    else:  # torch.save reports a full disk as RuntimeError("... file write failed"), with no errno
        lines = str(err).strip().splitlines() or [type(err).__name__]
        reason = lines[0][:200]
    tail = f"; {outcome}" if outcome else ""
    return CheckpointError(f"cannot write {what} to {path} ({reason}; {_free_space(path)} free there); "
                           f"{_STORAGE_FIX}{tail}")


# ----------------------------------------------------------------------------------------------------------
# Durability primitives


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new, renamed or removed names) on POSIX; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows cannot open directories
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _stream_sha256(f) -> str:
    """sha256 of an open binary file, read in 8 MiB chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    while n := f.readinto(buffer):
        digest.update(view[:n])
    return digest.hexdigest()


def hash_and_fsync(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file; also fsyncs it, since the ranks that wrote it may not have."""
    with open(path, "rb", buffering=0) as f:
        digest = _stream_sha256(f)
        size = os.fstat(f.fileno()).st_size
        os.fsync(f.fileno())
    return size, digest


def sha256_file(path: Path) -> str:
    with open(path, "rb", buffering=0) as f:
        return _stream_sha256(f)


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it over `path`, else remove it."""
    path = Path(path)
    outcome = f"the previous {path.name}, if any, is unchanged"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if is_storage_error(e):
            raise storage_error(e, path.name, path.parent, outcome) from e
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fault_point("file_tmp")
        # mkstemp creates 0600 (and writers may recreate the file): keep the old file's mode, else 0644
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fault_point("file_renamed")
        # a killed earlier write's temp: mkstemp's 8 random characters between the name and ".tmp" (so the temp of a
        # longer name, ".x.json.<8>.tmp" beside x, is not this file's)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.????????.tmp"):
            if "." not in stale.name[len(path.name) + 2:-4]:
                stale.unlink(missing_ok=True)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_storage_error(e):
            raise storage_error(e, path.name, path.parent, outcome) from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` for text (config.yaml, hybrid.json, ...)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors atomically (e.g. gates.safetensors); metadata values must be str.
    Equal tensors and metadata give equal bytes (see `_sort_safetensors_metadata`)."""
    from safetensors.torch import save_file

    with _atomic_target(path) as tmp:
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_safetensors_metadata(tmp)
    return Path(path)


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header of a safetensors file with its metadata keys sorted, in place.

    safetensors keeps metadata in a Rust HashMap, so its key order (and the file's bytes) changes from process to
    process. The sorted header holds the same keys and values, so it is as long as the original, and the tensor
    data and offsets (relative to the end of the header) stay where they are; the format allows padding the header
    with spaces, should the JSON come out shorter.
    """
    with open(path, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        metadata = header.pop("__metadata__")
        text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > header_len:  # never with safetensors' own serializer; keep its valid, unsorted header
            logger.debug("kept the unsorted metadata of %s (sorted header %d > %d bytes)", path, len(text), header_len)
            return
        f.seek(8)
        f.write(text.ljust(header_len, b" "))


def load_safetensors_verified(path: str | os.PathLike, *, device: str = "cpu", with_metadata: bool = False):
    """Load a safetensors file; a missing, truncated or malformed file becomes a one-line `CheckpointError`.

    safetensors checks the header and that every tensor lies inside the file, which catches truncation;
    flipped bits inside tensor data are only caught by a manifest hash (`verify(deep=True)`).
    Returns the tensors, or `(tensors, metadata)` with `with_metadata=True`.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises SafetensorError, OSError or RuntimeError depending on the damage
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"corrupted or truncated safetensors file {path} ({reason}); restore it from an earlier checkpoint"
        ) from e
    return (tensors, metadata) if with_metadata else tensors
