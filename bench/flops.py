"""Model FLOPs of a Llama-shaped model, for MFU (P5): 2·N per token and pass for the weights, plus attention.

Model FLOPs, not hardware FLOPs: recomputation under activation checkpointing is not counted, so MFU says how much
of the chip the *model's* arithmetic uses. Multiply-adds count as 2 FLOPs.
"""

from __future__ import annotations

from flashmorph.model.shape import ModelShape

# datasheet dense bf16 tensor-core peaks (no sparsity), FLOP/s
PEAK_BF16_FLOPS = {"H100 SXM": 989.4e12, "H100 PCIe": 756.0e12, "H200": 989.4e12}


def matmul_params(config) -> int:
    """N: the weights every token is multiplied by, i.e. q/k/v/o and the gated MLP of every layer plus the LM head.
    The input embedding is a table lookup and the norms are elementwise, so neither is counted."""
    shape = ModelShape.from_config(config)
    hidden = shape.hidden_size
    q_out, kv_out = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    mlp = 3 * hidden * shape.intermediate_size  # gate, up, down
    return shape.num_layers * (attention + mlp) + hidden * shape.vocab_size


def attention_flops_per_token(config, seq_len: int, num_full_layers: int | None = None, num_linear_layers: int = 0,
                              causal: bool = True) -> float:
    """Forward FLOPs per token of the token mixing itself (its projections are in N):

    softmax layer: scores q·k and the weighted sum of v, 2·H·Dh FLOPs each per visible key: 4·H·Dh·T per token,
    halved under a causal mask (on average a token sees T/2 keys) -> 2·H·Dh·T;
    linear (GLA) layer: the state update k^T v and the read-out q·S, 2·H·Dh·Dh each -> 4·H·Dh², independent of T.
    num_full_layers defaults to every layer that is not linear.
    """
    shape = ModelShape.from_config(config)
    head_dim, heads = shape.head_dim, shape.num_heads
    if num_full_layers is None:
        num_full_layers = shape.num_layers - num_linear_layers
    softmax = 4 * heads * head_dim * seq_len * (0.5 if causal else 1.0)
    linear = 4 * heads * head_dim * head_dim
    return num_full_layers * softmax + num_linear_layers * linear


def model_flops_per_token(config, seq_len: int, *, training: bool = True, weight_grads: bool = True,
                          num_full_layers: int | None = None, num_linear_layers: int = 0, causal: bool = True) -> float:
    """Model FLOPs per token of one step: forward 2·N + A; the backward adds 2·N for the activation gradients,
    2·N more when the weights get gradients, and 2·A. So a full training step is 6·N + 3·A (for a causal all-softmax
    Llama: 6·N + 6·L·H·Dh·T), a frozen-weight step (gate search, a LoRA-free teacher) 4·N + 3·A, a forward 2·N + A.
    A = attention_flops_per_token(...). LoRA adapters' own FLOPs are small and not counted."""
    n = matmul_params(config)
    a = attention_flops_per_token(config, seq_len, num_full_layers, num_linear_layers, causal)
    if not training:
        return 2 * n + a
    return (6 if weight_grads else 4) * n + 3 * a


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its torch.cuda.get_device_name(), or None if it is not in the table."""
    if "H100" in device_name:
        return PEAK_BF16_FLOPS["H100 PCIe" if "PCIe" in device_name else "H100 SXM"]
    if "H200" in device_name:
        return PEAK_BF16_FLOPS["H200"]
    return None


def mfu(flops: float, seconds: float, device_name: str) -> float | None:
    """Model FLOPs utilisation: flops / seconds over the device's dense bf16 peak; None for an unknown device."""
    peak = peak_flops(device_name)
    return None if peak is None or seconds <= 0 else flops / seconds / peak
