"""Load a HF causal LM directory for morphing, with clear errors for what flashmorph cannot morph."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from flashmorph.config import DTYPES
from flashmorph.errors import FlashMorphError
from flashmorph.model.families import SUPPORTED_MODEL_TYPES

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the recipe's dtype names -> torch dtypes


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def load_causal_lm(model_dir: str | Path, dtype: str = "bfloat16"):
    """from_pretrained on a local directory (never the hub), softmax path on SDPA, in eval mode."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FlashMorphError(f"{model_dir} holds no config.json; point model.path at a HF model directory")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), attn_implementation="sdpa",
                                                 local_files_only=True)
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise FlashMorphError(
            f"model type {model.config.model_type!r} is not supported; flashmorph morphs {SUPPORTED_MODEL_TYPES}")
    return model.eval()
