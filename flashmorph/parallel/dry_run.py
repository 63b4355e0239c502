"""A weight-free look at one rank of a parallel run: the model built on the meta device, each parameter's piece on a
rank (the TP rules, then ZeRO-3 over SP x DP), and the collectives one optimizer step issues. Nothing is allocated
and no process group is needed, so it answers for any world size on any machine."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from flashmorph.model.shape import ModelShape
from flashmorph.parallel import tp_rules
from flashmorph.parallel.layout import ParallelLayout
from flashmorph.parallel.tensor import holds_slice


@functools.lru_cache(maxsize=16)
def meta_model(shape: ModelShape, num_layers: int = 1) -> nn.Module:
    """The HF causal LM of `shape` on the meta device with `num_layers` decoder layers (every layer has the same
    parameters, so one stands for all; building 80 layers on meta only costs time)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = shape.hf_config_kwargs() | {"num_hidden_layers": num_layers}
    if shape.model_type in ("llama", ""):
        kwargs["attention_bias"] = shape.qkv_bias
    config = AutoConfig.for_model(shape.model_type or "llama", **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class RankParams:
    """Parameter counts of the base model (no adapters) on one rank, from its meta build and the TP rules."""

    total: int  # the whole model
    per_tp_rank: int  # what one TP rank holds (projections split, embedding / lm_head / norms whole)
    layer_per_tp_rank: int  # one decoder layer on one TP rank: what ZeRO-3 gathers at a time
    by_kind: dict[str, int]  # per TP rank, by TP rule kind (column, row, replicated, vocab)


def rank_params(shape: ModelShape, tp: int) -> RankParams:
    """Per-TP-rank parameter counts of `shape` by the same rules that cut a live model (`tp_rules`)."""
    lm = meta_model(shape)
    layers = shape.num_layers
    total = per_rank = layer_local = 0
    by_kind: dict[str, int] = {}
    for name, param in lm.named_parameters():
        rule = tp_rules.tp_rule(name)
        local = param.numel() // tp if holds_slice(rule, tp) else param.numel()
        copies = layers if ".layers.0." in name else 1
        total += copies * param.numel()
        per_rank += copies * local
        if copies > 1:
            layer_local += local
        kind = tp_rules.REPLICATED if rule.kind == tp_rules.VOCAB else rule.kind  # no vocab split in a live model
        by_kind[kind] = by_kind.get(kind, 0) + copies * local
    return RankParams(total, per_rank, layer_local, by_kind)


@dataclass(frozen=True)
class Collective:
    """One kind of collective a rank issues in a training step."""

    op: str  # all_reduce | all_to_all | all_gather | reduce_scatter
    group: str  # tp | sp | sp x dp
    what: str  # which module issues it and why
    per_step: int  # calls per optimizer step on one rank
    bytes_each: float  # payload of one call on one rank (bytes)

    @property
    def bytes_per_step(self) -> float:
        return self.per_step * self.bytes_each


@dataclass(frozen=True)
class StepShape:
    """What one rank computes per optimizer step, as far as communication depends on it."""

    local_tokens: int  # micro_batch x seq_len / SP
    micro_steps: int  # gradient accumulation steps
    dtype_bytes: int
    trainable_per_tp_rank: float  # parameters the optimizer holds on one TP rank (before ZeRO)
    checkpointing: bool  # activation checkpointing: every layer runs its forward twice
    zero_stage: int
    teacher: bool  # a teacher forward per micro step (distillation: a frozen copy, or LoRA's base with adapters off)


def communication_plan(shape: ModelShape, layout: ParallelLayout, step: StepShape,
                       params: RankParams) -> list[Collective]:
    """The collectives of one optimizer step on one rank (docs/parallelism.md), with their payloads:

    TP (megatron-core): an all-reduce of the hidden states after o_proj and down_proj in every forward, and of the
    input gradient of each column-parallel projection (q, k, v, gate, up) in the backward.
    Ulysses SP: an all-to-all of q, k, v (sequence -> heads) and of the attention output (back) per layer and
    direction. ZeRO-3: an all-gather of each layer's TP-local parameters per forward and backward, and a
    reduce-scatter of the trainable gradients per micro step, over SP x DP; ZeRO 0-2 all-reduce the gradients.
    Left out as small or rare: the embedding / lm_head / final-norm gathers, loss and grad-norm scalars.
    """
    tp, sp, group = layout.tensor, layout.sequence, layout.sequence * layout.data
    layers, tokens, p = shape.num_layers, step.local_tokens, step.dtype_bytes
    forwards = 2 if step.checkpointing else 1  # the recompute runs each layer's forward again in the backward
    student_fwd = step.micro_steps * layers * forwards
    teacher_fwd = step.micro_steps * layers if step.teacher else 0
    backward = step.micro_steps * layers
    hidden_bytes = tokens * shape.hidden_size * p
    plan = []
    if tp > 1:
        plan.append(Collective("all_reduce", "tp", "o_proj + down_proj output (forward, recompute, teacher)",
                               2 * (student_fwd + teacher_fwd), hidden_bytes))
        plan.append(Collective("all_reduce", "tp", "q/k/v/gate/up input gradient (backward)", 5 * backward,
                               hidden_bytes))
    if sp > 1:
        heads, kv_heads = shape.num_heads // tp, max(shape.num_kv_heads // tp, sp)
        q_bytes = tokens * heads * shape.head_dim * p
        kv_bytes = tokens * kv_heads * shape.head_dim * p
        attention_bytes = (2 * q_bytes + 2 * kv_bytes) / 4  # q and out, k and v: the mean of the four
        plan.append(Collective("all_to_all", "sp", "q, k, v in and attention out (forward, recompute, teacher)",
                               4 * (student_fwd + teacher_fwd), attention_bytes))
        plan.append(Collective("all_to_all", "sp", "their gradients (backward)", 4 * backward, attention_bytes))
    if group > 1 and step.zero_stage == 3:
        gathers = student_fwd + backward + teacher_fwd
        plan.append(Collective("all_gather", "sp x dp", "one decoder layer's parameters (forward, backward)",
                               gathers, params.layer_per_tp_rank * p))
    if group > 1 and step.trainable_per_tp_rank:
        op, per_step = ("reduce_scatter", step.micro_steps) if step.zero_stage >= 2 else ("all_reduce", 1)
        plan.append(Collective(op, "sp x dp", "trainable gradients", per_step, step.trainable_per_tp_rank * p))
    return plan
