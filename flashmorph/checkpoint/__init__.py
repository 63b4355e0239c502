"""Checkpointing: atomic, manifest-verified `step_N` directories and atomic single-file writes."""

from flashmorph.checkpoint.atomic import (
    MANIFEST_NAME,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_dir,
    checkpoint_step,
    finalize,
    latest_complete,
    list_checkpoints,
    load_safetensors_verified,
    prepare_staging,
    prune,
    read_manifest,
    seal_directory,
    staging_dir,
    verify,
)

__all__ = [
    "MANIFEST_NAME",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_dir",
    "checkpoint_step",
    "finalize",
    "latest_complete",
    "list_checkpoints",
    "load_safetensors_verified",
    "prepare_staging",
    "prune",
    "read_manifest",
    "seal_directory",
    "staging_dir",
    "verify",
]
