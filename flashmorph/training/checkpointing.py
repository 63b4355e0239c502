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


def _damage_record(ckpt: Path, err: CheckpointError) -> dict:
    """What summary.json records of a damaged checkpoint: its step, the file to blame and why."""
    file = err.file
    if file is not None and Path(file).is_absolute():
        try:
            file = str(Path(file).relative_to(ckpt))
        except ValueError:
            pass
    return {"step": atomic.checkpoint_step(ckpt), "file": file, "problem": str(err)}


def newest_intact_checkpoint(root: Path, world_size: int, step: int | None = None
                             ) -> tuple[Path | None, str | None, list[dict]]:
    """(the checkpoint to resume from, None, damaged newer ones skipped), or (None, why not, ...) when checkpoints
    exist but none is intact, or (None, None, []) when there are none. Rank 0 only: it hashes every file.

    Intact: every file its manifest lists, with the listed size and sha256, nothing unlisted, and no pickle that
    asks for a type outside torch's safe set and the DeepSpeed allow-list. A damaged newer one is named in a
    warning and skipped, so the run falls back to the newest intact step. With `step` (--resume-from), only that
    checkpoint is considered: missing or damaged, it is refused."""
    from flashmorph.io.safe_load import check_pickles

    found = atomic.list_checkpoints(root)
    if step is not None:
        chosen = [c for c in found if atomic.checkpoint_step(c) == step]
        if not chosen:
            steps = ", ".join(str(atomic.checkpoint_step(c)) for c in found) or "none"
            return None, (f"--resume-from {step}: {root} holds no checkpoint of step {step} (steps there: {steps}); "
                          "pick one of them, or drop --resume-from to take the newest intact one"), []
        found = chosen
    damaged = []
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
                          "start a new run (docs/cluster.md)"), damaged
        try:
            atomic.verify(ckpt, deep=True)
            check_pickles(ckpt)
        except CheckpointError as err:
            if step is not None:
                return None, f"--resume-from {step}: {err}", [_damage_record(ckpt, err)]
            log.warning("skipping damaged checkpoint: %s", err)
            damaged.append(_damage_record(ckpt, err))
            continue
        if damaged:
            log.warning("resuming from step %d (%s), the newest intact checkpoint; damaged and skipped: %s",
                        atomic.checkpoint_step(ckpt), ckpt,
                        "; ".join(f"step {d['step']} ({d['file']})" for d in damaged))
        return ckpt, None, damaged
    if not found:
        return None, None, []
    return None, (f"none of the {len(found)} checkpoints in {root} is intact, so nothing was loaded (newest: "
                  f"{damaged[0]['problem']}); restore one, or start a new run in another run_dir"), damaged


def resume_checkpoint(engine, root: Path, info, step: int | None = None) -> dict | None:
    """Load the newest intact checkpoint (or the one of `step`) into `engine`; returns its client state, with
    "step" and "resume" (the step used and the damaged checkpoints skipped, for summary.json), or None if there
    is none at all. Checkpoints that exist but are all damaged, or a missing/damaged `step`, raise CheckpointError
    on every rank."""
    found = newest_intact_checkpoint(root, info.world_size, step) if info.is_main else (None, None, [])
    chosen, problem, damaged = distributed.broadcast_object((str(found[0]) if found[0] else None, *found[1:]))
    if problem is not None:
        raise CheckpointError(problem)
    if chosen is None:
        log.info("no complete checkpoint in %s: starting from step 0", root)
        return None
    state = zero.load_engine_checkpoint(engine, Path(chosen))
    log.info("resumed from %s (step %d)", chosen, state["step"])
    state["resume"] = {"step": state["step"], "checkpoint": Path(chosen).name, "chosen_by": "--resume-from"
                       if step is not None else "newest intact", "damaged_skipped": damaged}
    return state
