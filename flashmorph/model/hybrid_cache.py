"""The generation cache of a hybrid model: K/V for full-attention layers, one fp32 GLA state per linear layer.

Built on transformers' Cache API: a `DynamicCache` whose linear layers are `RecurrentStateLayer`s, so a
linear layer's memory is [B, H, D, Dv] however long the sequence grows, and it never keeps K/V.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from flashmorph.errors import FlashMorphError


class RecurrentStateLayer(CacheLayerMixin):
    """Cache layer of a linear-attention layer: its GLA recurrent state and how many tokens it has absorbed.

    The attention module calls `update` before the attention function; it only counts the tokens and hands
    the current step's k/v back, so nothing per token is stored. The morph attention function reads `state`
    and replaces it with the next one. `keys` and `values` stay None.
    """

    is_sliding = False
    is_compileable = False  # the state is replaced, not written in place
    is_croppable = False  # a recurrent state cannot forget tokens
    supports_early_init = False  # there are no K/V buffers to allocate ahead

    def __init__(self, **kwargs):
        super().__init__()
        self.state: torch.Tensor | None = None  # [B, H, D, Dv] fp32; None until the first token
        self.num_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.num_tokens += key_states.shape[-2]
        return key_states, value_states  # this step's k/v only: [B, Hkv, T, D]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the same sizes a KV layer reports, so the model's one causal mask fits its full layers
        return self.num_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        if self.state is not None:
            self.state = self.state.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.state is not None and self.state.device != self.device:
            self.state = self.state.to(self.device, non_blocking=True)

    def reset(self) -> None:
        self.state = None
        self.num_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise FlashMorphError(
                "a linear layer's recurrent state cannot drop tokens; assisted/speculative decoding does not work "
                "with hybrid models, generate without an assistant"
            )

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state[indices, ...]


def install_recurrent_layers(cache: Cache, layer_modes: list[str]) -> Cache:
    """Give every "linear" layer of `cache` a `RecurrentStateLayer`, in place; idempotent.

    This is how the plain `DynamicCache` that `generate` builds becomes a hybrid cache. A linear layer that
    already holds K/V (the cache was filled by a non-hybrid forward) cannot be converted: that is an error.
    """
    if cache.layer_class_to_replicate is not None:  # a DynamicCache built without a config grows lazily
        while len(cache.layers) < len(layer_modes):
            cache.layers.append(cache.layer_class_to_replicate())
    if len(cache.layers) != len(layer_modes):
        raise FlashMorphError(
            f"the cache has {len(cache.layers)} layers but the hybrid model {len(layer_modes)}; "
            "pass a cache built for this model (make_hybrid_cache(model)) or none"
        )
    for idx, mode in enumerate(layer_modes):
        layer = cache.layers[idx]
        if mode == "linear" and not isinstance(layer, RecurrentStateLayer):
            if _holds_tokens(layer):
                raise FlashMorphError(
                    f"the cache holds K/V for linear layer {idx}; start generation from an empty cache or "
                    "make_hybrid_cache(model)"
                )
            cache.layers[idx] = RecurrentStateLayer()
        elif mode != "linear" and isinstance(layer, RecurrentStateLayer):
            raise FlashMorphError(
                f"the cache keeps a recurrent state for layer {idx}, which this model runs as {mode!r}; "
                "use a cache built for this model's layout"
            )
    return cache


def _holds_tokens(layer) -> bool:
    get_seq_length = getattr(layer, "get_seq_length", None)
    return get_seq_length is not None and getattr(layer, "is_initialized", False) and get_seq_length() > 0


class HybridCache(DynamicCache):
    """A `DynamicCache` (so full layers keep the K/V layers transformers picks for `config`, sliding windows
    included) whose linear layers keep a recurrent state instead."""

    def __init__(self, config, layer_modes: list[str]):
        super().__init__(config=config)
        install_recurrent_layers(self, layer_modes)


def recurrent_layer(cache: Cache, layer_idx: int) -> RecurrentStateLayer:
    """The state-holding layer `layer_idx` of a hybrid cache; an error names the fix if it is a K/V layer."""
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if not isinstance(layer, RecurrentStateLayer):
        raise FlashMorphError(
            f"layer {layer_idx} is linear but the cache keeps {type(layer).__name__} for it; "
            "generate through a model prepared by apply_hybrid_layout or load_hybrid"
        )
    return layer


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the tensors of every layer of `cache` (K/V, recurrent states, any side buffers)."""
    seen: set[int] = set()

    def walk(value) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(vars(layer)) for layer in cache.layers)
