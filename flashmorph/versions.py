"""What a run was made with: Python, flashmorph (version, git commit) and the packages it depends on (versions.json)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import flashmorph

# key in versions.json -> distribution name on the package index
_TRACKED_PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "deepspeed": "deepspeed",
    "fla": "flash-linear-attention",
    "fla-core": "fla-core",
    "megatron-core": "megatron-core",
    "datasets": "datasets",
    "safetensors": "safetensors",
    "peft": "peft",
}


def _flashmorph_git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the flashmorph source checkout, or (None, None) when not run from a git checkout."""
    source_root = Path(flashmorph.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(source_root), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        # an installed copy inside some other repository (e.g. a venv in a project) must not report that repo
        if Path(git("rev-parse", "--show-toplevel")).resolve() != source_root:
            return None, None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def collect_versions() -> dict[str, Any]:
    """Python, flashmorph (version and git commit) and the versions of the packages a run depends on."""
    versions: dict[str, Any] = {"python": platform.python_version(), "flashmorph": flashmorph.__version__}
    commit, dirty = _flashmorph_git_commit()
    versions["flashmorph_git_commit"] = commit
    versions["flashmorph_git_dirty"] = dirty
    for key, dist in _TRACKED_PACKAGES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = "not installed"
    torch = sys.modules.get("torch")  # only if already imported: recording versions must not import torch
    if torch is not None:
        versions["torch_cuda"] = getattr(torch.version, "cuda", None)
    return versions
