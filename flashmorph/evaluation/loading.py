"""Load what an evaluation scores: any HF causal LM directory (plain, or a flashmorph hybrid export) and its tokenizer.

Every check here reads only config.json and tokenizer files, so bad input fails before any weight is loaded."""

from pathlib import Path

import torch
from torch import nn

from flashmorph.data.from_model import has_tokenizer
from flashmorph.errors import ConfigError, FlashMorphError, check_choice
from flashmorph.model.hf_dir import check_eval_model_dir
from flashmorph.model.shape import read_model_config  # noqa: F401 (re-exported)
from flashmorph.model.hybrid import SECTION_KEY
from flashmorph.model.load import TORCH_DTYPES

DTYPES = {"auto": "auto", **TORCH_DTYPES}  # "auto": as saved


def is_hybrid_export(model_config: dict) -> bool:
    return isinstance(model_config.get(SECTION_KEY), dict)


def check_dtype(dtype: str) -> None:
    check_choice("--dtype", dtype, DTYPES)


def check_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device; use e.g. cpu or cuda:0") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asks for CUDA but none is available here; use --device cpu")
    return resolved


def load_eval_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu") -> nn.Module:
    """The model of `model_dir` in eval mode on `device`: through `flashmorph.load_hybrid` when config.json has
    a flashmorph section (so linear layers run as linear attention), else AutoModelForCausalLM."""
    check_dtype(dtype)
    target = check_device(device)
    if is_hybrid_export(check_eval_model_dir(model_dir, f"--model {model_dir}")):
        try:
            from flashmorph import load_hybrid
        except (ImportError, AttributeError):
            raise FlashMorphError(
                f"{model_dir} is a flashmorph hybrid export but this flashmorph has no load_hybrid; update flashmorph"
            ) from None
        model = load_hybrid(model_dir, dtype=None if dtype == "auto" else dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], local_files_only=True,
                                                     use_safetensors=True)
    return model.to(target).eval()


def load_eval_tokenizer(model_dir: str | Path, needed_for: str = "this evaluation"):
    """The tokenizer saved in `model_dir`; a one-line error if it has none."""
    if not has_tokenizer(model_dir):
        raise ConfigError(
            f"--model {model_dir} has no tokenizer (tokenizer.json / tokenizer.model / tokenizer_config.json), "
            f"which {needed_for} needs; copy the base model's tokenizer files into it"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
