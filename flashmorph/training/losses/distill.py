"""Logit distillation loss (τ²·KL teacher‖student, optional CE) from final hidden states, tiled over tokens and
vocabulary so the N × V logits never exist whole; plus the naive full-logits reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from flashmorph.errors import ConfigError, FlashMorphError

IGNORE_INDEX = -100
Head = Callable[[torch.Tensor], torch.Tensor]  # [n, hidden] -> logits [n, vocab]


@dataclass
class DistillLossSums:
    """Sums over this call's tokens, not means: parallel callers all-reduce them, then divide by global counts."""

    loss_sum: torch.Tensor  # fp32 scalar: kl_sum + ce_weight * ce_sum, the one to backprop
    kl_sum: torch.Tensor  # fp32 scalar: Σ_tokens τ² · KL(p_teacher^τ ‖ p_student^τ)
    ce_sum: torch.Tensor  # fp32 scalar: Σ_labelled tokens student cross-entropy at τ = 1 (0 without labels)
    num_tokens: torch.Tensor  # int64 scalar: tokens in this call (KL is over all of them)
    num_label_tokens: torch.Tensor  # int64 scalar: tokens whose label is not -100


def chunked_distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: Head,
                         teacher_head: Head, shift_labels: torch.Tensor | None = None, *, temperature: float = 1.0,
                         ce_weight: float = 0.0, token_chunk: int = 1024, vocab_chunk: int = 8192,
                         head_params: Sequence[torch.Tensor] | None = None) -> DistillLossSums:
    """Distillation sums for N already-selected tokens; gradients reach student_hidden and the student head only.

    student_hidden [N, H] / teacher_hidden [N, H_t]: final hidden states (padding dropped); shift_labels [N] or None.
    student_head / teacher_head map [n, H] -> [n, V] (the models' lm_head modules, so ZeRO-3 hooks gather their
    weights; one module may serve both). Each is called once per token chunk in forward and again in backward (the
    teacher always under no_grad), so a head that needs a context (adapters disabled) must carry it itself.
    head_params: the student head's trainable parameters (default: those of student_head if it is an nn.Module);
    their gradients accumulate in .grad through a nested backward (flagged for ZeRO so they are reduced once), even
    when student_hidden needs no gradient.

    Peak extra memory, with b = bytes per logit of the heads' dtype, n = token_chunk, v = vocab_chunk:
    forward 2·n·V·b (one chunk of student and teacher logits) + ~5·n·v·4 (fp32 slice temporaries) + 3·N·4
    (per-token log-normalisers saved for backward); backward adds n·V·b for the logits gradient and the head's own
    backward buffers, plus the N × H gradient of student_hidden that any loss produces. Nothing scales with N × V.
    """
    labels = _validate(student_hidden, teacher_hidden, shift_labels, temperature, ce_weight, token_chunk,
                       vocab_chunk)
    if head_params is None:
        head_params = student_head.parameters() if isinstance(student_head, nn.Module) else ()
    trainable = [p for p in head_params if p.requires_grad]
    plan = _Plan(student_head, teacher_head, float(temperature), token_chunk, vocab_chunk, trainable)
    # The head parameters are not Function inputs: autograd would then run their grad hooks once more (with no
    # gradient) after the nested backward, and ZeRO would reduce them twice. An empty anchor keeps the loss
    # differentiable when only the head is trainable.
    anchor = None
    if trainable and not student_hidden.requires_grad:
        anchor = torch.empty(0, device=student_hidden.device, requires_grad=True)
    kl_sum, ce_sum = _ChunkedDistill.apply(plan, student_hidden, teacher_hidden.detach(), labels, anchor)
    num_label_tokens = (labels != IGNORE_INDEX).sum() if labels is not None else _int_scalar(0, student_hidden)
    return DistillLossSums(loss_sum=kl_sum + ce_weight * ce_sum if ce_weight else kl_sum, kl_sum=kl_sum,
                           ce_sum=ce_sum, num_tokens=_int_scalar(student_hidden.shape[0], student_hidden),
                           num_label_tokens=num_label_tokens)


def distill_loss_reference(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: Head,
                           teacher_head: Head, shift_labels: torch.Tensor | None = None, *, temperature: float = 1.0,
                           ce_weight: float = 0.0) -> DistillLossSums:
    """Naive version with the full [N, V] logits in fp32; same contract as chunked_distill_loss."""
    labels = _validate(student_hidden, teacher_hidden, shift_labels, temperature, ce_weight, 1, 1)
    student_logits = student_head(student_hidden).float()  # [N, V]
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()  # [N, V]
    kl_sum = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                      reduction="sum", log_target=True) * temperature**2
    if labels is None:
        ce_sum = student_logits.new_zeros(())
        num_label_tokens = _int_scalar(0, student_hidden)
    else:
        ce_sum = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        num_label_tokens = (labels != IGNORE_INDEX).sum()
    return DistillLossSums(loss_sum=kl_sum + ce_weight * ce_sum, kl_sum=kl_sum, ce_sum=ce_sum,
                           num_tokens=_int_scalar(student_hidden.shape[0], student_hidden),
                           num_label_tokens=num_label_tokens)


@dataclass
class _Plan:
    """The non-tensor arguments of one call, handed through autograd.Function.apply as a single object."""

    student_head: Head
    teacher_head: Head
    temperature: float
    token_chunk: int
    vocab_chunk: int
    head_params: list[torch.Tensor]

    def token_ranges(self, num_tokens: int) -> list[tuple[int, int]]:
        # An empty call still runs the heads once (on [0, H]) so ZeRO-3's gathers and gradient hooks stay in step
        # with ranks that do have tokens.
        starts = range(0, max(num_tokens, 1), self.token_chunk)
        return [(s, min(s + self.token_chunk, num_tokens)) for s in starts]

    def vocab_ranges(self, vocab: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.vocab_chunk, vocab)) for s in range(0, vocab, self.vocab_chunk)]


class _ChunkedDistill(torch.autograd.Function):
    """Forward keeps only scalar sums and per-token log-normalisers; backward recomputes one token chunk of
    logits at a time and backprops through the student head with the analytic logits gradient."""

    @staticmethod
    def forward(ctx, plan: _Plan, student_hidden, teacher_hidden, labels, anchor):
        device = student_hidden.device
        ctx.plan = plan
        ctx.autocast = _autocast_state(device.type)
        # Restored before the recompute so a head with dropout (e.g. LoRA on lm_head) draws the same masks.
        ctx.rng = (torch.get_rng_state(), get_device_states(student_hidden, teacher_hidden))
        num_tokens = student_hidden.shape[0]
        lse_student_t = torch.empty(num_tokens, dtype=torch.float32, device=device)
        lse_teacher_t, lse_student = torch.empty_like(lse_student_t), torch.empty_like(lse_student_t)
        kl_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        for s, e in plan.token_ranges(num_tokens):
            student_logits = plan.student_head(student_hidden[s:e])  # [n, V]
            teacher_logits = plan.teacher_head(teacher_hidden[s:e])  # [n, V]
            _check_logits(student_logits, teacher_logits, e - s)
            chunk_labels = labels[s:e] if labels is not None else None
            kl, lse_student_t[s:e], lse_teacher_t[s:e], lse_student[s:e] = _chunk_forward(
                plan, student_logits, teacher_logits, chunk_labels is not None)
            kl_sum += kl.sum()
            if chunk_labels is not None:
                valid = chunk_labels != IGNORE_INDEX
                target = student_logits.gather(1, chunk_labels.clamp(min=0)[:, None]).squeeze(1).float()  # [n]
                ce_sum += torch.where(valid, lse_student[s:e] - target, 0.0).sum()
            del student_logits, teacher_logits
        ctx.save_for_backward(student_hidden, teacher_hidden, labels, lse_student_t, lse_teacher_t, lse_student)
        return kl_sum, ce_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, grad_ce):
        plan: _Plan = ctx.plan
        student_hidden, teacher_hidden, labels, lse_student_t, lse_teacher_t, lse_student = ctx.saved_tensors
        grad_hidden = torch.zeros_like(student_hidden) if ctx.needs_input_grad[1] else None
        ranges = plan.token_ranges(student_hidden.shape[0])
        cpu_rng, (devices, device_rng) = ctx.rng
        with torch.random.fork_rng(devices=devices), torch.autocast(**ctx.autocast):
            torch.set_rng_state(cpu_rng)
            set_device_states(devices, device_rng)
            for i, (s, e) in enumerate(ranges):
                hidden = student_hidden[s:e].detach().requires_grad_(grad_hidden is not None)
                with torch.enable_grad():
                    student_logits = plan.student_head(hidden)  # [n, V], with a graph through the head
                with torch.no_grad():
                    teacher_logits = plan.teacher_head(teacher_hidden[s:e])  # [n, V]
                grad_logits = _chunk_logits_grad(
                    plan, student_logits.detach(), teacher_logits, labels[s:e] if labels is not None else None,
                    lse_student_t[s:e], lse_teacher_t[s:e], lse_student[s:e], grad_kl, grad_ce)
                del teacher_logits
                if student_logits.requires_grad:
                    with _zero_grad_ready(plan.head_params, last=i == len(ranges) - 1):
                        torch.autograd.backward(student_logits, grad_logits)
                if grad_hidden is not None and hidden.grad is not None:
                    grad_hidden[s:e] = hidden.grad
                del student_logits, grad_logits
        # Head parameters got their gradients through the nested backward above (as torch.utils.checkpoint does).
        return None, grad_hidden, None, None, None


def _chunk_forward(plan: _Plan, student_logits, teacher_logits, want_lse_student: bool):
    """Per-token τ²·KL and log-normalisers of one token chunk, reading one vocab slice at a time.

    Online over slices: lse = logaddexp(lse, lse_slice), and E = Σ_v p_t (a − b) is rescaled to the new normaliser.
    """
    tau = plan.temperature
    shape, device = (student_logits.shape[0],), student_logits.device
    lse_t = torch.full(shape, float("-inf"), device=device)  # teacher, logits / τ
    lse_s = torch.full(shape, float("-inf"), device=device)  # student, logits / τ
    lse_ce = torch.full(shape, float("-inf"), device=device)  # student, τ = 1 (for CE)
    expected_diff = torch.zeros(shape, device=device)  # Σ_v p_t · (a − b) over the slices seen so far
    for s, e in plan.vocab_ranges(student_logits.shape[1]):
        a = teacher_logits[:, s:e].float() / tau  # [n, v] fp32
        b = student_logits[:, s:e].float() / tau  # [n, v] fp32
        lse_a = torch.logsumexp(a, -1)
        slice_diff = (torch.exp(a - lse_a[:, None]) * (a - b)).sum(-1)  # expectation under the slice's softmax
        new_lse_t = torch.logaddexp(lse_t, lse_a)
        expected_diff = expected_diff * torch.exp(lse_t - new_lse_t) + slice_diff * torch.exp(lse_a - new_lse_t)
        lse_t = new_lse_t
        lse_s = torch.logaddexp(lse_s, torch.logsumexp(b, -1))
        if want_lse_student and tau != 1.0:
            lse_ce = torch.logaddexp(lse_ce, torch.logsumexp(student_logits[:, s:e].float(), -1))
    if tau == 1.0:
        lse_ce = lse_s
    kl = (expected_diff - lse_t + lse_s) * tau**2  # KL = Σ p_t (a − b) − lse_a + lse_b
    return kl, lse_s, lse_t, lse_ce


def _chunk_logits_grad(plan: _Plan, student_logits, teacher_logits, labels, lse_s, lse_t, lse_ce, grad_kl, grad_ce):
    """d loss / d student_logits for one token chunk, in the logits' dtype, built one vocab slice at a time.

    d(τ²·KL)/dz = τ·(p_s^τ − p_t^τ); d CE/dz = softmax(z) − onehot(label) on labelled tokens.
    """
    tau = plan.temperature
    grad_logits = torch.empty_like(student_logits)  # [n, V]
    kl_scale = grad_kl.float() * tau
    if labels is not None:
        valid = labels != IGNORE_INDEX
        ce_scale = torch.where(valid, grad_ce.float(), 0.0)[:, None]  # [n, 1]
    for s, e in plan.vocab_ranges(student_logits.shape[1]):
        z = student_logits[:, s:e].float()  # [n, v] fp32
        p_s = torch.exp(z / tau - lse_s[:, None])
        g = kl_scale * (p_s - torch.exp(teacher_logits[:, s:e].float() / tau - lse_t[:, None]))
        if labels is not None:
            g += ce_scale * (p_s if tau == 1.0 else torch.exp(z - lse_ce[:, None]))
            in_slice = valid & (labels >= s) & (labels < e)
            column = (labels - s).clamp(0, e - s - 1)[:, None]
            g.scatter_add_(1, column, -torch.where(in_slice[:, None], ce_scale, 0.0))
        grad_logits[:, s:e] = g
    return grad_logits


@contextmanager
def _zero_grad_ready(params: list[torch.Tensor], last: bool):
    """DeepSpeed ZeRO reduces a parameter's gradient when its hook sees `ds_grad_is_ready` (default True); hold it
    back until the last chunk so the chunks' gradients accumulate and are reduced once (as TiledMLP does)."""
    before = [getattr(p, "ds_grad_is_ready", None) for p in params]
    for p in params:
        p.ds_grad_is_ready = last
    try:
        yield
    finally:
        for p, value in zip(params, before):
            if value is None:
                del p.ds_grad_is_ready
            else:
                p.ds_grad_is_ready = value


def _autocast_state(device_type: str) -> dict:
    if not torch.amp.is_autocast_available(device_type):
        return {"device_type": "cpu", "enabled": False}
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def _int_scalar(value: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=like.device)


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, num_tokens: int) -> None:
    if student_logits.dim() != 2 or student_logits.shape[0] != num_tokens:
        raise FlashMorphError(f"student_head returned {tuple(student_logits.shape)}; it must map [n, H] to [n, V]")
    if teacher_logits.shape != student_logits.shape:
        raise FlashMorphError(f"teacher logits {tuple(teacher_logits.shape)} != student logits "
                              f"{tuple(student_logits.shape)}; teacher and student need the same vocabulary")


def _validate(student_hidden, teacher_hidden, shift_labels, temperature, ce_weight, token_chunk, vocab_chunk):
    """Check the arguments; returns shift_labels as a flat [N] tensor (or None)."""
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0 (1.0 is plain KL)")
    if not ce_weight >= 0:
        raise ConfigError(f"ce_weight={ce_weight} must be >= 0 (0 disables the CE term)")
    if not (isinstance(token_chunk, int) and token_chunk >= 1):
        raise ConfigError(f"token_chunk={token_chunk} must be an integer >= 1")
    if not (isinstance(vocab_chunk, int) and vocab_chunk >= 1):
        raise ConfigError(f"vocab_chunk={vocab_chunk} must be an integer >= 1")
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise FlashMorphError(f"hidden states must be [N, H] (flatten batch and sequence first); got student "
                              f"{tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise FlashMorphError(f"student_hidden has {student_hidden.shape[0]} tokens but teacher_hidden has "
                              f"{teacher_hidden.shape[0]}; select the same tokens from both")
    if shift_labels is None:
        if ce_weight:
            raise ConfigError(f"ce_weight={ce_weight} needs shift_labels; pass them or set ce_weight=0")
        return None
    if shift_labels.numel() != student_hidden.shape[0]:
        raise FlashMorphError(f"shift_labels has {shift_labels.numel()} entries for {student_hidden.shape[0]} "
                              f"tokens; select the same tokens from labels and hidden states")
    return shift_labels.reshape(-1).long()
