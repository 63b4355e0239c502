"""The exported hybrid: a standard HF directory that `load_hybrid` turns back into a generating hybrid model.

It holds what `save_pretrained` writes (config.json with a `flashmorph` section, safetensors weights,
generation_config.json), the source's tokenizer files, versions.json and a manifest; never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from flashmorph.errors import ConfigError, FlashMorphError, check_choice
from flashmorph.model.config import MorphConfig
from flashmorph.model.hf_dir import validate_model_dir
from flashmorph.model.shape import read_model_config
from flashmorph.model.hybrid import SECTION_KEY, apply_hybrid_layout, parse_layout, read_hybrid_section, read_layout
from flashmorph.model.load import TORCH_DTYPES

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
VERSIONS_NAME = "versions.json"
# copied verbatim when the source directory has them (all text, JSON or sentencepiece protobuf)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_STAGING_PREFIX = ".tmp-"
_REPLACED_PREFIX = ".old-"


def resolve_dtype(dtype) -> torch.dtype | None:
    """None (keep the checkpoint's dtype), a torch dtype, or one of TORCH_DTYPES' names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    check_choice("--dtype", dtype, TORCH_DTYPES)
    return TORCH_DTYPES[dtype]


def check_out_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    """The output path, if it may be written: absent, an empty directory, or anything else with force."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty; choose another directory or pass --force to replace it")
    return out


def export_hybrid(
    model_dir: str | os.PathLike,
    layout,
    out_dir: str | os.PathLike,
    *,
    dtype=None,
    force: bool = False,
    morph_config: MorphConfig | None = None,
) -> Path:
    """Load `model_dir`, apply `layout` (hybrid.json path, parsed dict or list of modes) and save the hybrid.

    Every input is checked before any weight is read. Returns the output directory.
    """
    shape = validate_model_dir(model_dir, f"--model {model_dir}")  # family, keys, weight headers, tokenizer
    if isinstance(layout, (str, os.PathLike)):
        modes = read_layout(layout, shape.num_layers)
    else:
        modes = parse_layout(layout, shape.num_layers)
    torch_dtype = resolve_dtype(dtype)
    check_out_dir(out_dir, force)
    morph_config = morph_config or MorphConfig()
    morph_config.validate()

    lm = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype or "auto", attn_implementation="sdpa", local_files_only=True, use_safetensors=True
    )
    apply_hybrid_layout(lm, modes, morph_config)
    return save_hybrid(lm, out_dir, force=force, tokenizer_from=model_dir)


def save_hybrid(lm: nn.Module, out_dir: str | os.PathLike, *, force: bool = False,
                tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write a hybrid model (after `apply_hybrid_layout`) as an HF directory, atomically.

    Everything is written into a sibling staging directory first and renamed into place when complete, so
    `out_dir` is never half written; with `force`, an existing `out_dir` is replaced only at that point.
    """
    if not isinstance(getattr(lm.config, SECTION_KEY, None), dict):
        raise FlashMorphError("the model carries no hybrid layout; call apply_hybrid_layout before saving")
    out = check_out_dir(out_dir, force).absolute()
    staging = out.parent / f"{_STAGING_PREFIX}{out.name}"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted export
    staging.mkdir(parents=True)
    try:
        lm.save_pretrained(staging)
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_from) / name).is_file():
                    shutil.copy2(Path(tokenizer_from) / name, staging / name)
        _write_sidecars(staging)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported hybrid model to %s", out)
    return out


def _write_sidecars(directory: Path) -> None:
    from flashmorph.versions import collect_versions

    pickles = sorted(p.name for p in directory.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
    if pickles:  # save_pretrained writes safetensors in transformers 5.x; guard the promise anyway
        raise FlashMorphError(f"export produced pickle file(s) {pickles}; upgrade transformers to 5.x")
    (directory / VERSIONS_NAME).write_text(json.dumps(collect_versions(), indent=1) + "\n", encoding="utf-8")
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        files.append({"path": path.relative_to(directory).as_posix(), "size": path.stat().st_size,
                      "sha256": digest.hexdigest()})
    (directory / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    aside = out.parent / f"{_REPLACED_PREFIX}{out.name}"
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(out, aside)
    os.rename(staging, out)
    shutil.rmtree(aside)


def load_hybrid(path: str | os.PathLike, dtype=None, **from_pretrained_kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` with the exported layout re-applied: a hybrid model that
    generates (KV cache for full layers, recurrent state for linear ones). dtype: None (as saved), a torch
    dtype or a name; other keyword arguments go to from_pretrained (e.g. device_map)."""
    path = Path(path)
    validate_model_dir(path)  # family, keys, weight headers: one line before from_pretrained, never a traceback
    raw = read_model_config(path)
    modes, morph_config = read_hybrid_section(raw.get(SECTION_KEY), raw.get("num_hidden_layers"),
                                              where=str(path / "config.json"))
    options = {"attn_implementation": "sdpa", "local_files_only": True, "use_safetensors": True}
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype) or "auto",
                                              **(options | from_pretrained_kwargs))
    apply_hybrid_layout(lm, modes, morph_config)
    return lm.eval()
