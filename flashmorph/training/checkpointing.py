"""Atomic DeepSpeed-engine checkpoints for any stage: staged, sealed with a manifest, verified on resume."""

import logging
from pathlib import Path

import torch

from flashmorph.checkpoint import atomic
from flashmorph.errors import CheckpointError
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
        failure = str(atomic.storage_error(err, f"checkpoint step {step} (rank {info.rank})", staging,
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


def _seal(root: Path, step: int, keep_last: int, world_size: int) -> None:
    atomic.finalize(root, step, {"step": step, "world_size": world_size})  # storage failures: CheckpointError
    if keep_last:
        try:
            atomic.prune(root, keep_last)
        except OSError as err:  # the new checkpoint is sealed; an old one left behind costs only space
            log.warning("could not prune old checkpoints in %s (%s)", root, err)


def resume_checkpoint(engine, root: Path, info) -> dict | None:
    """Load the latest complete checkpoint into `engine`; returns its client state (with "step"), or None."""
    latest = atomic.latest_complete(root) if info.is_main else None
    latest = distributed.broadcast_object(str(latest) if latest else None)
    if latest is None:
        log.info("no complete checkpoint in %s: starting from step 0", root)
        return None
    manifest = atomic.verify(Path(latest), deep=info.is_main)
    saved_world = manifest["meta"].get("world_size")
    if saved_world is not None and saved_world != info.world_size:
        # ZeRO partitions the trainable and optimizer state by rank; DeepSpeed cannot load it at another count
        raise CheckpointError(f"{latest} was written by {saved_world} ranks and this job has {info.world_size}; "
                              f"resume on {saved_world} GPUs, or carry the weights to the new count with "
                              "tools/reshard.py and start a new run (docs/cluster.md)")
    state = zero.load_engine_checkpoint(engine, Path(latest))
    log.info("resumed from %s (step %d)", latest, state["step"])
    return state
