"""Gate search's answer-token loss: the chunked path (logits recomputed in backward) against one pass over all rows."""

import math

import torch
from torch import nn

from flashmorph.training.losses.retrieval import answer_token_ce


class RecordingHead(nn.Module):
    """An LM head that remembers how many rows each call saw."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.proj = nn.Linear(hidden, vocab, bias=False)
        self.rows_seen: list[int] = []

    def forward(self, hidden):
        self.rows_seen.append(hidden.shape[0])
        return self.proj(hidden)


def _loss_and_grads(token_chunk: int, rows: int = 37):
    torch.manual_seed(0)
    head = RecordingHead(16, 50)
    hidden = torch.randn(rows, 16, requires_grad=True)
    targets = torch.randint(0, 50, (rows,), generator=torch.Generator().manual_seed(1))
    out = answer_token_ce(hidden, targets, head, token_chunk=token_chunk)
    out["loss_sum"].backward()
    return out, hidden.grad, head.proj.weight.grad, head.rows_seen


def test_chunks_give_the_one_pass_loss_hits_and_gradients():
    whole, hidden_grad, head_grad, seen = _loss_and_grads(token_chunk=4096)
    assert seen == [37]  # one pass, nothing recomputed
    chunked, chunk_hidden_grad, chunk_head_grad, chunk_seen = _loss_and_grads(token_chunk=8)
    torch.testing.assert_close(chunked["loss_sum"], whole["loss_sum"], rtol=1e-6, atol=1e-5)
    assert int(chunked["num_correct"]) == int(whole["num_correct"]) and int(chunked["num_tokens"]) == 37
    torch.testing.assert_close(chunk_hidden_grad, hidden_grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunk_head_grad, head_grad, rtol=1e-6, atol=1e-6)
    # at most 8 rows of logits at a time, and every chunk's logits rebuilt in backward instead of kept
    chunks = math.ceil(37 / 8)
    assert max(chunk_seen) == 8 and len(chunk_seen) == 2 * chunks and sum(chunk_seen) == 2 * 37
