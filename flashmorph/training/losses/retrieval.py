"""Gate search's loss: cross-entropy on the answer tokens of retrieval samples (and the module that computes it in
its forward) plus a linearization regularizer on the gates, whose weight lambda may ramp up over the first steps."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashmorph.model.morph import MorphableLM


ANSWER_TOKEN_CHUNK = 4096  # rows of logits that exist at once; retrieval batches have far fewer answer tokens


def answer_token_ce(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                    token_chunk: int = ANSWER_TOKEN_CHUNK) -> dict[str, torch.Tensor]:
    """Summed cross-entropy of N answer tokens' hidden states [N, hidden] against their targets [N], and how many
    the argmax gets right; only these N rows go through the LM head (no T x vocab logits).

    Above `token_chunk` rows (a dataset that labels every token of a long sequence) the rows go through the head a
    chunk at a time and each chunk's logits are recomputed in backward, so at most token_chunk x vocab logits exist.
    """
    if targets.numel() <= token_chunk:
        loss_sum, num_correct = _ce_and_hits(hidden, targets, head)
    else:
        loss_sum, num_correct = 0.0, 0
        for start in range(0, targets.numel(), token_chunk):
            rows = slice(start, start + token_chunk)
            chunk_loss, chunk_hits = checkpoint(_ce_and_hits, hidden[rows], targets[rows], head, use_reentrant=False)
            loss_sum, num_correct = loss_sum + chunk_loss, num_correct + chunk_hits
    return {"loss_sum": loss_sum, "num_tokens": torch.tensor(targets.numel(), device=targets.device),
            "num_correct": num_correct}


def _ce_and_hits(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()  # [rows, vocab]
    return nn.functional.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


class RetrievalLossModel(MorphableLM):
    """The module gate search trains under DeepSpeed: a MorphableLM whose forward ends in the answer-token loss, so
    ZeRO-3 gathers the LM head inside the engine's forward. It adds no parameter: checkpoints are MorphableLM's."""

    def forward(self, input_ids, labels=None, position_ids=None, gate_values=None, shift_labels=None):
        """`loss_sum` (summed CE over answer tokens), `num_tokens`, `num_correct` and `gate_values`."""
        out = super().forward(input_ids, labels, position_ids, gate_values, shift_labels)
        sums = answer_token_ce(out["hidden"], out["targets"], self.lm.get_output_embeddings())
        return {**sums, "gate_values": out["gate_values"]}


def regularizer(gate_values: torch.Tensor, kind: str, budget_fraction: float) -> torch.Tensor:
    """Linearization pressure: the mean gate, or only its excess over the budget fraction."""
    mean_gate = gate_values.mean()
    if kind == "mean":
        return mean_gate
    return torch.relu(mean_gate - budget_fraction)


def reg_lambda(step: int, weight: float, warmup_steps: int) -> float:
    """The regularizer's weight at 0-based `step`: ramps linearly to `weight` over `warmup_steps` (0 = constant)."""
    if warmup_steps == 0:
        return weight
    return weight * min(1.0, (step + 1) / warmup_steps)
