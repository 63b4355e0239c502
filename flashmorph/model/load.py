"""Load a HF causal LM directory for morphing, with clear errors for what flashmorph cannot morph."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from flashmorph.model.config import DTYPES
from flashmorph.model.families import SUPPORTED_MODEL_TYPES  # noqa: F401 (re-exported: the one families table)
from flashmorph.model.hf_dir import validate_model_dir

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the recipe's dtype names -> torch dtypes


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def load_causal_lm(model_dir: str | Path, dtype: str = "bfloat16"):
    """from_pretrained on a local directory (never the hub, never a pickle), softmax path on SDPA, in eval mode.

    The directory is validated first (family, config keys, weight headers, tokenizer ids), so a bad one is refused
    with one line before any weight is read."""
    validate_model_dir(model_dir, f"model.path={model_dir}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype), attn_implementation="sdpa",
                                                 local_files_only=True, use_safetensors=True)
    return model.eval()
