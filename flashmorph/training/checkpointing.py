"""Atomic DeepSpeed-engine checkpoints for any stage: staged, sealed with a manifest, verified on resume."""

import logging
from pathlib import Path

import torch

from flashmorph.checkpoint import atomic
from flashmorph.errors import CheckpointError
from flashmorph.io import atomic as io_atomic
from flashmorph.parallel import distributed, zero

log = logging.getLogger(__name__)


def save_checkpoint(engine, root: Path, step: int, client_state: dict, keep_last: int, info) -> None:
    """Every rank writes its shard into a staging dir; rank 0 seals it (manifest, rename) once all are done.

    A write that fails on any rank (disk full, quota, read-only or unwritable dir) raises the same one-line
    CheckpointError on every rank, after rank 0 removed the staging dir; earlier checkpoints stay as they were.
    """
    distributed.run_on_main(lambda: atomic.prepare_staging(root, step), info)
    staging = atomic.staging_dir(root, step)
    failure = None
    try:
        zero.save_engine_checkpoint(engine, staging, {"step": step, **client_state})
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        failure = str(io_atomic.storage_error(err, f"checkpoint step {step} (rank {info.rank})", staging,
                                              "earlier checkpoints are intact"))
        # DeepSpeed's save_checkpoint ends with one barrier after all its file writes; ranks whose writes
        # succeeded wait there, so a rank whose write failed joins it to keep the collectives in step
        distributed.barrier()
    failure = _first_failure(failure, info)
    if failure is not None:
        if info.is_main:
            atomic.discard_staging(root, step)
        distributed.barrier()
        raise CheckpointError(failure)
    distributed.run_on_main(lambda: _seal(root, step, keep_last, info.world_size), info)


def _first_failure(message: str | None, info) -> str | None:
    """The failure message of the lowest failing rank, on every rank (None when all succeeded)."""
    failed = torch.zeros(info.world_size, device=info.device)
    failed[info.rank] = float(message is not None)
    failed = distributed.all_reduce_sum(failed)
    ranks = failed.nonzero().flatten().tolist()
    if not ranks:
        return None
    return distributed.broadcast_object(message, src=ranks[0])


# DeepSpeed copies these scripts into every ZeRO checkpoint; code has no place in a run directory (tools/reshard.py
# does what they do), so they are removed before the checkpoint is sealed
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def _seal(root: Path, step: int, keep_last: int, world_size: int) -> None:
    for name in _RECOVERY_SCRIPTS:
        (atomic.staging_dir(root, step) / name).unlink(missing_ok=True)
    atomic.finalize(root, step, {"step": step, "world_size": world_size})  # storage failures: CheckpointError
    if keep_last:
        try:
            atomic.prune(root, keep_last)
        except OSError as err:  # the new checkpoint is sealed; an old one left behind costs only space
            log.warning("could not prune old checkpoints in %s (%s)", root, err)


def newest_intact_checkpoint(root: Path, world_size: int) -> tuple[Path | None, str | None]:
    """(the newest checkpoint that is intact, None), or (None, why none is) when checkpoints exist but all are
    damaged, or (None, None) when there are none. Rank 0 only: it hashes every file.

    Intact: every file its manifest lists, with the listed size and sha256, nothing unlisted, and no pickle that
    asks for a type outside torch's safe set and the DeepSpeed allow-list. A damaged newer one is named in a
    warning and skipped, so the run falls back to the newest intact step."""
    from flashmorph.io.safe_load import check_pickles

    found = atomic.list_checkpoints(root)
    problems = []
    for ckpt in reversed(found):
        try:
            saved_world = atomic.read_manifest(ckpt)["meta"].get("world_size")
        except CheckpointError:
            saved_world = None  # verify below names the problem
        if saved_world is not None and saved_world != world_size:
            # ZeRO partitions the trainable and optimizer state by rank; DeepSpeed cannot load it at another count.
            # Refused before any rank file is read: this is a wrong job, not a damaged checkpoint to skip.
            return None, (f"{ckpt} was written by {saved_world} ranks and this job has {world_size}; resume on "
                          f"{saved_world} GPUs, or carry the weights to the new count with tools/reshard.py and "
                          "start a new run (docs/cluster.md)")
        try:
            atomic.verify(ckpt, deep=True)
            check_pickles(ckpt)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s", err)
            problems.append(str(err))
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint (%d newer ones are damaged)", ckpt,
                        len(problems))
        return ckpt, None
    if not found:
        return None, None
    return None, (f"none of the {len(found)} checkpoints in {root} is intact, so nothing was loaded (newest: "
                  f"{problems[0]}); restore one, or start a new run in another run_dir")


def resume_checkpoint(engine, root: Path, info) -> dict | None:
    """Load the newest intact checkpoint into `engine`; returns its client state (with "step"), or None if there
    is none at all. Checkpoints that exist but are all damaged raise CheckpointError on every rank."""
    chosen, problem = newest_intact_checkpoint(root, info.world_size) if info.is_main else (None, None)
    chosen, problem = distributed.broadcast_object((str(chosen) if chosen else None, problem))
    if problem is not None:
        raise CheckpointError(problem)
    if chosen is None:
        log.info("no complete checkpoint in %s: starting from step 0", root)
        return None
    state = zero.load_engine_checkpoint(engine, Path(chosen))
    log.info("resumed from %s (step %d)", chosen, state["step"])
    return state
