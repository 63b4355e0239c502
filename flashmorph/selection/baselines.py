"""Selection baselines the gates are compared with: periodic placement, random, and one-layer-linearized scores
(leave-one-out retrieval loss, KL to the all-softmax model, LM NLL). Each returns a HybridLayout with its cost."""

import logging
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from flashmorph.errors import ConfigError, check_choice
from flashmorph.model.config import MorphConfig
from flashmorph.model.morph import apply_layer_modes, attention_modules
from flashmorph.selection.discretize import resolve_budget, top_k_indices
from flashmorph.selection.layout import HybridLayout, SelectionCost, layout_from_full_layers

log = logging.getLogger(__name__)
SELECTION_SPLIT = "selection"  # a data stream apart from gate search's "train" and evaluation's "eval"
PERIODIC_VARIANTS = ("keep_first", "keep_last", "keep_both", "centered")
METRICS = ("retrieval", "kl", "nll")
KL_POSITIONS = ("answer", "all")
# what each metric measures, for log lines (the metric names themselves are recipe/CLI values)
METRIC_LABELS = {"retrieval": "answer-token nll", "nll": "all-token nll", "kl": "kl to all-softmax"}
_LOGIT_ROWS = 1024  # hidden rows turned into logits at once, so [tokens, vocab] is never built whole


def heldout_batches(dataset, num_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """`num_batches` batches of `batch_size` consecutive items of `dataset` (build it on SELECTION_SPLIT)."""
    if num_batches < 1 or batch_size < 1:
        raise ConfigError(f"--num-batches={num_batches} and --batch-size={batch_size} must both be >= 1")
    return [dataset.batch(range(b * batch_size, (b + 1) * batch_size)) for b in range(num_batches)]


# ------------------------------------------------------------------------------------- data-free baselines


def periodic_indices(num_layers: int, k: int, variant: str = "keep_first") -> list[int]:
    """k evenly spaced layers (stride num_layers / k). keep_first starts at layer 0 ([0, 2] of 4), keep_last ends
    at the last layer ([1, 3]), keep_both spans first to last ([0, 3]; k = 1 keeps layer 0), centered sits in the
    middle of each stride."""
    check_choice("--periodic-variant", variant, PERIODIC_VARIANTS)
    if k == 0:
        return []
    if variant == "keep_first":
        return [i * num_layers // k for i in range(k)]
    if variant == "keep_last":
        return sorted(num_layers - 1 - i * num_layers // k for i in range(k))
    if variant == "centered":
        return [(2 * i + 1) * num_layers // (2 * k) for i in range(k)]
    if k == 1:
        return [0]
    # round half up in integers: stride (L-1)/(k-1) >= 1 keeps the indices distinct
    return [(2 * i * (num_layers - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def periodic_layout(num_layers: int, budget, variant: str = "keep_first", inputs: dict | None = None) -> HybridLayout:
    started = time.perf_counter()
    k = resolve_budget(budget, num_layers)
    kept = periodic_indices(num_layers, k, variant)
    cost = SelectionCost(wall_seconds=time.perf_counter() - started)
    return layout_from_full_layers(num_layers, kept, "periodic", cost=cost,
                                   inputs={**(inputs or {}), "budget": budget, "k": k, "variant": variant})


def random_layout(num_layers: int, budget, seed: int = 0, inputs: dict | None = None) -> HybridLayout:
    """k layers drawn uniformly without replacement by its own seeded generator (global RNGs untouched)."""
    started = time.perf_counter()
    k = resolve_budget(budget, num_layers)
    kept = sorted(random.Random(seed).sample(range(num_layers), k))
    cost = SelectionCost(wall_seconds=time.perf_counter() - started)
    return layout_from_full_layers(num_layers, kept, "random", cost=cost,
                                   inputs={**(inputs or {}), "budget": budget, "k": k, "seed": seed})


# ------------------------------------------------------------------------------ one-layer-linearized scores


@dataclass
class LinearizationScores:
    scores: list[float]  # per layer: how much the metric rises when only that layer is linear (higher = keep)
    base: float  # the metric of the all-softmax model (0 for KL, which compares against it)
    cost: SelectionCost


@contextmanager
def _restored_attention(lm: nn.Module):
    """Put back the model's attention setup after probing, so scoring leaves no trace on `lm`."""
    modules = attention_modules(lm)
    saved = [getattr(module, "morph", None) for module in modules]
    implementation = lm.config._attn_implementation
    try:
        yield
    finally:
        for module, spec in zip(modules, saved):
            if spec is not None:
                module.morph = spec
            elif hasattr(module, "morph"):
                del module.morph
        lm.config._attn_implementation = implementation


def _scored_positions(batch: dict[str, torch.Tensor], positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T-1] of the positions whose next token is scored, their target ids [N])."""
    if positions == "answer":
        targets = batch["labels"][:, 1:]
        mask = targets != -100
    else:
        targets = batch["input_ids"][:, 1:]
        mask = torch.ones_like(targets, dtype=torch.bool)
    return mask, targets[mask]


def _cross_entropy_sum(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> float:
    total = 0.0
    for start in range(0, rows.shape[0], _LOGIT_ROWS):
        logits = head(rows[start:start + _LOGIT_ROWS]).float()  # [chunk, vocab]
        total += nn.functional.cross_entropy(logits, targets[start:start + _LOGIT_ROWS], reduction="sum").item()
    return total


def _kl_sum(head: nn.Module, reference_rows: torch.Tensor, rows: torch.Tensor) -> float:
    """sum over rows of KL(p_reference || p), the all-softmax model's distribution first."""
    total = 0.0
    for start in range(0, rows.shape[0], _LOGIT_ROWS):
        log_p = torch.log_softmax(head(rows[start:start + _LOGIT_ROWS]).float(), dim=-1)  # [chunk, vocab]
        log_ref = torch.log_softmax(head(reference_rows[start:start + _LOGIT_ROWS]).float(), dim=-1)
        total += nn.functional.kl_div(log_p, log_ref, log_target=True, reduction="sum").item()
    return total


@torch.no_grad()
def linearization_scores(lm: nn.Module, morph_config: MorphConfig, batches: Sequence[dict[str, torch.Tensor]],
                         metric: str, positions: str = "answer") -> LinearizationScores:
    """Linearize one layer at a time (every other layer softmax) and measure the damage on `batches`.

    metric "retrieval": answer-token cross-entropy increase; "nll": next-token NLL increase on all tokens;
    "kl": KL from the all-softmax model's next-token distribution, on answer or all positions. Per-token means.
    Costs (num_layers + 1) x len(batches) forward passes.
    """
    check_choice("metric", metric, METRICS)
    check_choice("--kl-positions", positions, KL_POSITIONS)
    if not batches:
        raise ConfigError("no held-out batches to score layers on; set --num-batches >= 1")
    positions = {"retrieval": "answer", "nll": "all", "kl": positions}[metric]
    device = next(lm.parameters()).device
    head, decoder = lm.get_output_embeddings(), lm.get_decoder()
    scored = [_scored_positions(batch, positions) for batch in batches]
    if sum(int(mask.sum()) for mask, _ in scored) == 0:
        raise ConfigError(f"the held-out batches have no {positions} tokens to score; check the data section")
    num_layers = len(attention_modules(lm))
    lm.eval()
    started = time.perf_counter()
    passes = tokens = 0
    references: list[torch.Tensor] = []  # KL: the all-softmax model's hidden rows, [N, hidden] per batch
    values = []  # per configuration (all softmax, then layer 0 linear, 1, ...): the per-token mean metric
    with _restored_attention(lm):
        for linear_layer in [None, *range(num_layers)]:
            modes = ["full"] * num_layers
            if linear_layer is not None:
                modes[linear_layer] = "linear"
            apply_layer_modes(lm, morph_config, modes)
            total = count = 0.0
            for b, (batch, (mask, targets)) in enumerate(zip(batches, scored)):
                input_ids = batch["input_ids"].to(device)
                hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, hidden]
                rows = hidden[:, :-1][mask.to(device)]  # [N, hidden]
                passes, tokens = passes + 1, tokens + input_ids.numel()
                if metric == "kl" and linear_layer is None:
                    references.append(rows)  # KL of the reference with itself is 0: nothing to add
                elif metric == "kl":
                    total += _kl_sum(head, references[b], rows)
                else:
                    total += _cross_entropy_sum(head, rows, targets.to(device))
                count += rows.shape[0]
            values.append(total / count)
            log.info("layer %s linear: %s = %.4f per token", "none" if linear_layer is None else linear_layer,
                     METRIC_LABELS[metric], values[-1])
    cost = SelectionCost(forward_passes=passes, wall_seconds=time.perf_counter() - started, tokens=tokens)
    base = values[0]
    return LinearizationScores([v - base for v in values[1:]], base, cost)


def _scored_layout(lm, morph_config, batches, budget, metric: str, method: str, positions: str = "answer",
                   inputs: dict | None = None) -> HybridLayout:
    num_layers = len(attention_modules(lm))
    k = resolve_budget(budget, num_layers)  # before any forward pass: a bad budget fails at once
    result = linearization_scores(lm, morph_config, batches, metric, positions)
    kept = top_k_indices(result.scores, k)
    first = batches[0]["input_ids"]
    inputs = {**(inputs or {}), "budget": budget, "k": k, "metric": metric, "num_batches": len(batches),
              "batch_size": first.shape[0], "seq_len": first.shape[1], "base_value": result.base}
    if metric == "kl":
        inputs["kl_positions"] = positions
    return layout_from_full_layers(num_layers, kept, method, inputs=inputs, layer_scores=result.scores,
                                   cost=result.cost)


def leave_one_out_layout(lm: nn.Module, morph_config: MorphConfig, batches, budget,
                         inputs: dict | None = None) -> HybridLayout:
    """Keep the k layers whose linearization raises the answer-token retrieval loss most."""
    return _scored_layout(lm, morph_config, batches, budget, "retrieval", "leave_one_out", inputs=inputs)


def kl_layout(lm: nn.Module, morph_config: MorphConfig, batches, budget, positions: str = "answer",
              inputs: dict | None = None) -> HybridLayout:
    """Keep the k layers whose linearization moves the output distribution furthest (KL) from the all-softmax one."""
    return _scored_layout(lm, morph_config, batches, budget, "kl", "kl", positions, inputs=inputs)


def nll_layout(lm: nn.Module, morph_config: MorphConfig, batches, budget, inputs: dict | None = None) -> HybridLayout:
    """Keep the k layers whose linearization raises the LM NLL on all tokens of the held-out sequences most.
    With data.haystack=text most of those tokens are corpus text, so this is a language-modelling signal."""
    return _scored_layout(lm, morph_config, batches, budget, "nll", "nll", inputs=inputs)
