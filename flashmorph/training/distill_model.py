"""The module DeepSpeed trains in distillation: a hybrid student, its teacher, and the tiled KL between them.

The teacher is either the student's own weights with LoRA adapters disabled and every layer switched back to
softmax (no second copy), or a separate frozen model held as a submodule, so ZeRO-3 shards it like the student
and checkpoints skip it (frozen parameters are excluded).
"""

import dataclasses
from contextlib import ExitStack

import torch
from torch import nn

from flashmorph.model.morph import temporary_layer_modes
from flashmorph.training.losses.distill import chunked_distill_loss


def base_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class DistillModel(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module | None, *, temperature: float, ce_weight: float,
                 token_chunk: int, vocab_chunk: int):
        super().__init__()
        self.student = student  # a hybrid HF causal LM, possibly wrapped by peft
        self.teacher = teacher  # None: the student with adapters disabled and every layer softmax
        self.temperature, self.ce_weight = temperature, ce_weight
        self.token_chunk, self.vocab_chunk = token_chunk, vocab_chunk
        self.num_layers = base_lm(student).config.num_hidden_layers

    def _teacher_lm(self, stack: ExitStack) -> nn.Module:
        if self.teacher is not None:
            return self.teacher
        lm = base_lm(self.student)
        if hasattr(self.student, "disable_adapter"):
            stack.enter_context(self.student.disable_adapter())
        stack.enter_context(temporary_layer_modes(lm, ["full"] * self.num_layers))
        return lm

    @torch.no_grad()
    def teacher_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with ExitStack() as stack:
            lm = self._teacher_lm(stack)
            hidden = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return hidden  # [B, T_local, hidden]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, shift_labels: torch.Tensor | None = None):
        """Sums over this rank's tokens (KL on every token, CE on labelled ones) as a dict of tensors, the output
        type DeepSpeed's ZeRO-3 hooks can follow; see chunked_distill_loss for the keys."""
        teacher_hidden = self.teacher_hidden(input_ids, position_ids)
        student_lm = base_lm(self.student)
        student_hidden = student_lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                                  use_cache=False).last_hidden_state  # [B, T_local, hidden]
        teacher_head = (self.teacher if self.teacher is not None else student_lm).get_output_embeddings()
        labels = shift_labels.reshape(-1) if shift_labels is not None and self.ce_weight > 0 else None
        sums = chunked_distill_loss(
            student_hidden.reshape(-1, student_hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            student_lm.get_output_embeddings(), teacher_head, labels, temperature=self.temperature,
            ce_weight=self.ce_weight, token_chunk=self.token_chunk, vocab_chunk=self.vocab_chunk)
        return {f.name: getattr(sums, f.name) for f in dataclasses.fields(sums)}  # asdict would deep-copy
