"""Tiny random causal LMs of the supported families, built from transformers configs (no download)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from flashmorph.model.families import SUPPORTED_MODEL_TYPES as FAMILIES
from flashmorph.model.shape import ModelShape


def tiny_config(
    family: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 64,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
):
    """A transformers config of `family` at toy scale; head_dim = hidden_size // num_heads."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    shape = ModelShape(f"tiny {family}", num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
                       intermediate_size=intermediate_size or 4 * hidden_size, vocab_size=vocab_size)
    config = AutoConfig.for_model(
        family,
        **shape.hf_config_kwargs(),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family in ("qwen2", "mistral"):
        config.sliding_window = None  # toy models attend globally, like the softmax path of a real one at <= window
    return config


def build_tiny_model(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Random weights from `seed`, so every test that builds the same config gets the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()
