"""Checkpointing: atomic, manifest-verified `step_N` directories (single files: flashmorph.io.atomic) and reshard."""

from flashmorph.checkpoint.atomic import (
    MANIFEST_NAME,
    checkpoint_dir,
    checkpoint_step,
    finalize,
    latest_complete,
    list_checkpoints,
    prepare_staging,
    prune,
    read_manifest,
    seal_directory,
    staging_dir,
    verify,
)

__all__ = [
    "MANIFEST_NAME",
    "checkpoint_dir",
    "checkpoint_step",
    "finalize",
    "latest_complete",
    "list_checkpoints",
    "prepare_staging",
    "prune",
    "read_manifest",
    "seal_directory",
    "staging_dir",
    "verify",
]
