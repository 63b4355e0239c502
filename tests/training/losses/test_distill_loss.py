"""The tiled distillation loss equals the naive full-logits reference (values and gradients) and stays small."""

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.training.losses.distill import chunked_distill_loss, distill_loss_reference

# N is not a multiple of TOKEN_CHUNK, V not a multiple of VOCAB_CHUNK.
N, H, V, TOKEN_CHUNK, VOCAB_CHUNK = 37, 16, 53, 8, 10
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_inputs(dtype=torch.float32, seed=0, num_tokens=N, shared_head=False, logit_scale=3.0):
    """Student/teacher hidden states, heads (all trainable, to catch stray gradients) and labels with -100s."""
    gen = torch.Generator().manual_seed(seed)
    student_hidden = (torch.randn(num_tokens, H, generator=gen) * logit_scale).to(dtype).requires_grad_()
    teacher_hidden = (torch.randn(num_tokens, H, generator=gen) * logit_scale).to(dtype).requires_grad_()
    student_head = nn.Linear(H, V, bias=False).to(dtype)
    teacher_head = student_head if shared_head else nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V, H, generator=gen) / H**0.5)
        if not shared_head:
            teacher_head.weight.copy_(torch.randn(V, H, generator=gen) / H**0.5)
    labels = torch.randint(0, V, (num_tokens,), generator=gen)
    labels[::3] = -100
    labels[1:2] = V - 1  # the last column, in the short last vocab slice
    return student_hidden, teacher_hidden, student_head, teacher_head, labels


def loss_and_grads(fn, inputs, backprop=lambda sums: sums.loss_sum, **kwargs):
    student_hidden, teacher_hidden, student_head, teacher_head, labels = inputs
    for t in (student_hidden, teacher_hidden, student_head.weight, teacher_head.weight):
        t.grad = None
    sums = fn(student_hidden, teacher_hidden, student_head, teacher_head, labels, **kwargs)
    backprop(sums).backward()
    return sums, student_hidden.grad.clone(), student_head.weight.grad.clone()


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_chunked_matches_reference(dtype, temperature, ce_weight):
    inputs = make_inputs(dtype)
    kwargs = dict(temperature=temperature, ce_weight=ce_weight)
    ref, ref_hidden_grad, ref_head_grad = loss_and_grads(distill_loss_reference, inputs, **kwargs)
    got, hidden_grad, head_grad = loss_and_grads(chunked_distill_loss, inputs, token_chunk=TOKEN_CHUNK,
                                                 vocab_chunk=VOCAB_CHUNK, **kwargs)
    for field in ("loss_sum", "kl_sum", "ce_sum"):
        assert_close(getattr(got, field), getattr(ref, field), dtype)
    assert got.kl_sum > 0 and got.ce_sum > 0  # labels are given, so ce_sum is reported even at ce_weight=0
    assert got.num_tokens.item() == N and got.num_label_tokens.item() == ref.num_label_tokens.item() == 24
    assert_close(hidden_grad, ref_hidden_grad, dtype)
    assert_close(head_grad, ref_head_grad, dtype)
    assert ref_hidden_grad.abs().max() > 1e-2  # the comparison is not between two zeros
    _, teacher_hidden, _, teacher_head, _ = inputs
    assert teacher_head.weight.grad is None and teacher_hidden.grad is None


def test_ce_sum_reported_and_differentiable_without_mixing():
    """With ce_weight=0 but labels given, ce_sum is still reported; each output has its own correct gradient."""
    inputs = make_inputs(seed=1)

    def mix(sums):
        return 0.7 * sums.kl_sum + 1.3 * sums.ce_sum

    kwargs = dict(temperature=2.0, backprop=mix)
    ref, ref_hidden_grad, ref_head_grad = loss_and_grads(distill_loss_reference, inputs, **kwargs)
    got, hidden_grad, head_grad = loss_and_grads(chunked_distill_loss, inputs, token_chunk=5, vocab_chunk=7, **kwargs)
    assert got.ce_sum > 0 and got.loss_sum is got.kl_sum
    assert_close(got.ce_sum, ref.ce_sum, torch.float32)
    assert_close(hidden_grad, ref_hidden_grad, torch.float32)
    assert_close(head_grad, ref_head_grad, torch.float32)


@pytest.mark.parametrize("token_chunk, vocab_chunk", [(1, 1), (N, V), (1000, 1000)])
def test_extreme_chunk_sizes(token_chunk, vocab_chunk):
    inputs = make_inputs(seed=2)
    ref, ref_hidden_grad, _ = loss_and_grads(distill_loss_reference, inputs, temperature=2.0, ce_weight=0.3)
    got, hidden_grad, _ = loss_and_grads(chunked_distill_loss, inputs, temperature=2.0, ce_weight=0.3,
                                         token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    assert_close(got.loss_sum, ref.loss_sum, torch.float32)
    assert_close(hidden_grad, ref_hidden_grad, torch.float32)


def test_shared_head_gets_only_the_student_gradient():
    """One module as both heads (the LoRA-teacher case): the teacher path contributes no gradient."""
    inputs = make_inputs(seed=3, shared_head=True)
    ref, _, ref_head_grad = loss_and_grads(distill_loss_reference, inputs, ce_weight=0.5)
    got, _, head_grad = loss_and_grads(chunked_distill_loss, inputs, ce_weight=0.5, token_chunk=TOKEN_CHUNK,
                                       vocab_chunk=VOCAB_CHUNK)
    assert_close(got.loss_sum, ref.loss_sum, torch.float32)
    assert_close(head_grad, ref_head_grad, torch.float32)


def test_identical_teacher_and_student_give_zero_kl():
    student_hidden, _, head, _, _ = make_inputs(seed=4, shared_head=True)
    sums = chunked_distill_loss(student_hidden, student_hidden.detach(), head, head, temperature=2.0,
                                token_chunk=TOKEN_CHUNK, vocab_chunk=VOCAB_CHUNK)
    assert abs(sums.kl_sum.item()) < 1e-4 and sums.ce_sum.item() == 0 and sums.num_label_tokens.item() == 0


def test_head_dropout_is_replayed_in_backward():
    """RNG is restored before the recompute: with one chunk, dropout masks (and so gradients) match the reference."""
    student_hidden, teacher_hidden, linear, teacher_head, labels = make_inputs(seed=5)
    student_head = nn.Sequential(nn.Dropout(0.5), linear).train()
    results = []
    for fn, kwargs in [(distill_loss_reference, {}), (chunked_distill_loss, dict(token_chunk=N, vocab_chunk=9))]:
        torch.manual_seed(123)
        for t in (student_hidden, linear.weight):
            t.grad = None
        sums = fn(student_hidden, teacher_hidden, student_head, teacher_head, labels, ce_weight=0.5, **kwargs)
        torch.manual_seed(999)  # whatever the RNG is at backward time must not matter
        sums.loss_sum.backward()
        results.append((sums.loss_sum, student_hidden.grad.clone(), linear.weight.grad.clone()))
    for got, ref in zip(results[1], results[0]):
        assert_close(got, ref, torch.float32)
    assert (results[0][1] == 0).any()  # dropout really ran: dropped hidden features get no gradient


def test_empty_call_still_runs_the_head():
    """A rank with no tokens returns zero sums and still backprops through the head (ZeRO-3 hooks stay in step)."""
    student_hidden, teacher_hidden, student_head, teacher_head, labels = make_inputs(seed=6, num_tokens=0)
    sums = chunked_distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, labels, ce_weight=1.0)
    sums.loss_sum.backward()
    assert sums.loss_sum.item() == 0 and sums.num_tokens.item() == 0 and sums.num_label_tokens.item() == 0
    assert student_head.weight.grad is not None and (student_head.weight.grad == 0).all()
    assert student_hidden.grad.shape == (0, H)


def test_trainable_head_alone_still_gets_gradients():
    """Frozen student body (hidden states without grad) but a trainable head: the loss is still differentiable."""
    student_hidden, teacher_hidden, student_head, teacher_head, labels = make_inputs(seed=7)
    inputs = (student_hidden.detach(), teacher_hidden, student_head, teacher_head, labels)
    sums = chunked_distill_loss(*inputs, ce_weight=0.5, token_chunk=TOKEN_CHUNK, vocab_chunk=VOCAB_CHUNK)
    sums.loss_sum.backward()
    head_grad = student_head.weight.grad.clone()
    student_head.weight.grad = None
    distill_loss_reference(*inputs, ce_weight=0.5).loss_sum.backward()
    assert_close(head_grad, student_head.weight.grad, torch.float32)


@pytest.mark.parametrize("hidden_needs_grad", [True, False])
def test_zero_ready_flag_is_held_until_the_last_chunk(hidden_needs_grad):
    """The head's gradient hook fires once per chunk (never once more from the outer graph), with
    ds_grad_is_ready=False on every chunk but the last, and no flag is left behind."""
    student_hidden, teacher_hidden, student_head, teacher_head, labels = make_inputs(seed=8)
    student_hidden = student_hidden.detach().requires_grad_(hidden_needs_grad)
    flags = []
    student_head.weight.register_post_accumulate_grad_hook(lambda p: flags.append(p.ds_grad_is_ready))
    sums = chunked_distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, token_chunk=TOKEN_CHUNK)
    sums.loss_sum.backward()
    assert flags == [False] * 4 + [True]  # ceil(37 / 8) = 5 chunks
    assert not hasattr(student_head.weight, "ds_grad_is_ready")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops under this mode (a storage counts until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self.tracked.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.tracked:
                    self.tracked.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


class RecordingHead(nn.Module):
    """A head that records the shape of every logits tensor it returns."""

    def __init__(self, linear):
        super().__init__()
        self.linear, self.shapes = linear, []

    def forward(self, hidden):
        logits = self.linear(hidden)
        self.shapes.append(tuple(logits.shape))
        return logits


def test_memory_stays_far_below_full_logits():
    num_tokens, vocab, token_chunk, vocab_chunk = 1024, 1024, 32, 128
    gen = torch.Generator().manual_seed(9)
    student_hidden = torch.randn(num_tokens, H, generator=gen).requires_grad_()
    teacher_hidden = torch.randn(num_tokens, H, generator=gen)
    student_head, teacher_head = RecordingHead(nn.Linear(H, vocab)), RecordingHead(nn.Linear(H, vocab))
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    full_logits_bytes = num_tokens * vocab * 4

    peaks = {}
    for name, fn, kwargs in [("reference", distill_loss_reference, {}),
                             ("chunked", chunked_distill_loss, dict(token_chunk=token_chunk, vocab_chunk=vocab_chunk))]:
        meter = LiveBytes()
        with meter:
            fn(student_hidden, teacher_hidden, student_head, teacher_head, labels, temperature=2.0, ce_weight=0.5,
               **kwargs).loss_sum.backward()
        peaks[name] = meter.peak
    assert peaks["reference"] > full_logits_bytes  # the meter does see whole logits when they exist
    # One chunk of student logits, teacher logits and their gradient is 3/32 of the full logits; weight and hidden
    # gradients, fp32 vocab slices and autograd temporaries bring the peak to about a fifth (0.88 of 4.2 MB here).
    assert peaks["chunked"] < full_logits_bytes / 4, peaks

    chunked_shapes = student_head.shapes[1:] + teacher_head.shapes[1:]  # [0] is the reference's full call
    assert len(chunked_shapes) == 2 * 2 * (num_tokens // token_chunk)  # each head: forward + backward per chunk
    assert max(rows for rows, _ in chunked_shapes) == token_chunk


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(temperature=0.0), ConfigError, "temperature=0.0"),
    (dict(temperature=-1.0), ConfigError, "temperature"),
    (dict(token_chunk=0), ConfigError, "token_chunk=0"),
    (dict(vocab_chunk=0), ConfigError, "vocab_chunk=0"),
    (dict(ce_weight=-0.1), ConfigError, "ce_weight"),
    (dict(ce_weight=0.5, labels=None), ConfigError, "needs shift_labels"),
    (dict(teacher_tokens=N - 1), FlashMorphError, "teacher_hidden has 36"),
    (dict(labels=torch.zeros(N - 2, dtype=torch.long)), FlashMorphError, "shift_labels has 35"),
    (dict(unflattened=True), FlashMorphError, "[N, H]"),
    (dict(teacher_vocab=V + 1), FlashMorphError, "same vocabulary"),
])
def test_invalid_arguments(kwargs, error, words):
    student_hidden, teacher_hidden, student_head, teacher_head, labels = make_inputs()
    labels = kwargs.pop("labels", labels)
    teacher_hidden = teacher_hidden[:kwargs.pop("teacher_tokens", N)]
    if kwargs.pop("unflattened", False):
        student_hidden = student_hidden[None]
    if "teacher_vocab" in kwargs:
        teacher_head = nn.Linear(H, kwargs.pop("teacher_vocab"))
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")) as info:
        chunked_distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, labels, **kwargs)
    assert "\n" not in str(info.value)
