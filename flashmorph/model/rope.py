"""Undo rotary position embeddings: recover the pre-RoPE q/k that the linear branch consumes."""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The forward rotation as Llama-family models apply it. x: [B, H, T, D]; cos/sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope`, in fp32. x: [B, H, T, D]; cos/sin: [B, T, D] (as the model's rotary_emb returns).

    RoPE rotates each (i, i + D/2) pair by an angle and scales by `attention_scaling` (1 for Llama-3 style
    scaling, != 1 for YaRN), so cos^2 + sin^2 is that scale squared; dividing by it makes the inverse exact
    for every rope type whose cos/sin are such a scaled rotation.
    """
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    x = x.float()
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
