"""One scoring forward pass shared by every evaluator: the logits of the last positions of any HF causal LM."""

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a module without parameters, e.g. a test oracle)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def last_logits(model: nn.Module, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions, [batch, keep, vocab], on the model's device, in the model's dtype
    (callers upcast slices: a whole fp32 copy at a 128K vocabulary costs gigabytes).

    `logits_to_keep` spares the [batch, seq, vocab] tensor (64 GB at 128K tokens and a 128K vocabulary);
    modules that ignore it return every position, which is then sliced here. No cache: scoring only."""
    keep = max(1, min(int(keep), input_ids.shape[1]))
    out = model(input_ids=input_ids.to(model_device(model)), use_cache=False, logits_to_keep=keep)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -keep:]
