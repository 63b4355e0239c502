"""The training steps P1, P2 and P7 measure: one forward+backward of a MorphableLM's answer-token loss with every
layer mixed (a gate-search step), softmax only, or linear only; same weights, same tokens.

Every mode's backward reaches the input embeddings (transformers' `enable_input_require_grads`, which it applies
itself whenever activation checkpointing is on), so the modes differ only in the attention they compute; in mixed
mode the gates get their gradients too. No optimizer step: AdamW over one scalar per layer costs nothing measurable.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import base_parser, build_lm, parse_lengths
from flashmorph.model.config import MorphConfig
from flashmorph.model.morph import MorphableLM, apply_layer_modes
from flashmorph.training.losses.retrieval import RetrievalLossModel

MODES = {"mixed": "gate search (both branches)", "full": "softmax only", "linear": "linear only"}


def step_parser(doc: str) -> argparse.ArgumentParser:
    """base_parser plus what a benchmark of train_step at several lengths takes (P1, P2): lengths, batch,
    checkpointing."""
    parser = base_parser(doc, default_shape="llama3-8b")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("8K,32K"), help="tokens per sample")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing (default on, as gate search runs)")
    return parser


def enable_activation_checkpointing(lm) -> None:
    """Non-reentrant checkpointing of every decoder layer, through whichever name this transformers has."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_morphable(shape: str, device: torch.device, dtype: torch.dtype, checkpointing: bool = True,
                    seed: int = 0, linear_backend: str = "auto") -> MorphableLM:
    """A random-weight model of `shape`, frozen and morphed, in training mode (checkpointing acts in training only)."""
    lm = build_lm(shape, device, dtype, seed)
    model = RetrievalLossModel(lm, MorphConfig(linear_backend=linear_backend))
    model.gates.to(device)
    if checkpointing:
        enable_activation_checkpointing(lm)
    lm.enable_input_require_grads()
    return model.train()


def set_mode(model: MorphableLM, mode: str) -> None:
    """Every layer "mixed" (gate search), "full" (softmax only) or "linear" (linear only)."""
    apply_layer_modes(model.lm, model.morph_config, [mode] * model.gates.num_layers)


def train_step(model: MorphableLM, batch: dict[str, torch.Tensor]) -> None:
    """Forward and backward of the mean answer-token cross-entropy; the gates' gradients are dropped after."""
    out = model(batch["input_ids"], labels=batch["labels"])
    loss = out["loss_sum"] / out["num_tokens"].clamp(min=1)
    loss.backward()
    model.gates.zero_grad(set_to_none=True)
