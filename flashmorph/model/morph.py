"""Morph a HF causal LM: every attention layer mixes its softmax path with a Liger-style linear branch.

Nothing of the model's code is copied: flashmorph registers one attention function ("morph") with
transformers' attention interface; each attention module carries a small `LayerMorph` record that
tells the function how to treat that layer. Gate values reach the function as a forward kwarg, and so
does a hybrid model's cache (`morph_cache`), whose linear layers hold the recurrent state.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from flashmorph.errors import FlashMorphError
from flashmorph.model.config import MorphConfig
from flashmorph.model.families import check_family
from flashmorph.model.gates import MorphGates
from flashmorph.model.hybrid_cache import RecurrentStateLayer, recurrent_layer
from flashmorph.model.ops.liger import liger_linear_attention, liger_linear_attention_with_state
from flashmorph.model.rope import undo_rope
from flashmorph.model.shape import ModelShape

# Never put "flash" in this name: transformers would treat it as a flash-attention request.
ATTN_KEY = "morph"
LAYER_MODES = ("mixed", "full", "linear")


def _additive_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """eager attention adds its mask to the scores, but the morph key registers SDPA's mask builder, which gives a
    boolean mask (True = attend), or None where SDPA relies on is_causal. Either becomes eager's additive float mask;
    without this, eager attention would see no causal mask at all."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask  # already additive
    if attention_mask is None:
        q_len, kv_len = query.shape[2], key.shape[2]
        # the queries are the last q_len positions of the kv_len keys (a prefill, or a decode step after a cache)
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = attention_mask[None, None]  # [1, 1, q_len, kv_len]
    additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
    return additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)


def _eager_softmax(module, query, key, value, attention_mask, **kwargs):
    return eager_attention_forward(module, query, key, value, _additive_mask(attention_mask, query, key), **kwargs)


_SOFTMAX_FUNCTIONS = {"sdpa": sdpa_attention_forward, "eager": _eager_softmax}
# attention kwargs that change the softmax in ways neither branch reproduces; families.py refuses such models up front
_UNSUPPORTED_KWARGS = ("softcap", "s_aux")


@dataclass
class LayerMorph:
    """Per-layer settings read by `morph_attention`; a plain record, so it holds no parameters."""

    layer_idx: int
    mode: str  # "mixed": gate-weighted sum of both branches; "full": softmax only; "linear": linear only
    config: MorphConfig
    rotary: nn.Module  # the model's rotary embedding, used to undo RoPE (holds buffers only)


def _linear_branch(module: nn.Module, spec: LayerMorph, query, key, value, position_ids,
                   state_layer: RecurrentStateLayer | None = None):
    # query: [B, H, T, D]; key/value: [B, Hkv, T, D], as transformers hands them over (RoPE applied).
    # state_layer: the layer's slot in a hybrid cache (generation), or None (a full-sequence forward).
    if key.shape[2] != query.shape[2]:
        raise FlashMorphError(
            "the morph linear branch got a KV cache longer than the query; generate with a hybrid model "
            "(apply_hybrid_layout or load_hybrid), not with a morphable model"
        )
    if spec.config.qk_source == "pre_rope":
        if position_ids is None:
            # the cache has already counted this step's tokens, so they start at num_tokens - T
            start = state_layer.num_tokens - query.shape[2] if state_layer is not None else 0
            position_ids = torch.arange(start, start + query.shape[2], device=query.device).unsqueeze(0)
        cos, sin = spec.rotary(value, position_ids)  # [B, T, D]
        query, key = undo_rope(query, cos, sin), undo_rope(key, cos, sin)
    settings = dict(
        num_kv_groups=query.shape[1] // key.shape[1],
        backend=spec.config.linear_backend,
        normalizer=spec.config.decay_normalizer,
    )
    if state_layer is None:
        return liger_linear_attention(query, key, value, **settings)  # [B, T, H, D]
    out, state_layer.state = liger_linear_attention_with_state(query, key, value, state_layer.state, **settings)
    return out  # [B, T, H, D]; the state [B, H, D, Dv] stays in the cache


def morph_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: softmax, linear, or their gate-weighted mix for this layer."""
    spec: LayerMorph | None = getattr(module, "morph", None)
    if spec is None:
        raise FlashMorphError(f"attention module {type(module).__name__} was not morphed; call morph_model first")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise FlashMorphError(f"{type(module).__name__} passes {name}= to its attention, which the morph attention "
                                  "would drop; this model family is not supported (see flashmorph/model/families.py)")
    softmax_fn = _SOFTMAX_FUNCTIONS[spec.config.softmax_impl]
    gate_values = kwargs.pop("morph_gates", None)
    cache = kwargs.pop("morph_cache", None)
    if spec.mode == "full":
        return softmax_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if spec.mode == "linear":
        state_layer = recurrent_layer(cache, spec.layer_idx) if cache is not None else None
        linear_out = _linear_branch(module, spec, query, key, value, kwargs.get("position_ids"), state_layer)
        return linear_out.to(value.dtype), None
    if cache is not None:
        raise FlashMorphError("a mixed softmax/linear layer cannot generate with a cache; discretize the gates first")
    linear_out = _linear_branch(module, spec, query, key, value, kwargs.get("position_ids"))
    if gate_values is None:
        raise FlashMorphError("a morphable model needs gate values: call it through MorphableLM, not the bare HF model")
    softmax_out, _ = softmax_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gate = gate_values[spec.layer_idx].to(softmax_out.dtype)  # [] or [H]
    gate = gate.view(1, 1, -1, 1) if gate.dim() == 1 else gate  # broadcast over [B, T, H, D]
    return gate * softmax_out + (1 - gate) * linear_out.to(softmax_out.dtype), None


def register_attention() -> None:
    """Register the morph attention (and its mask builder) with transformers; idempotent."""
    if ATTN_KEY not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTN_KEY, morph_attention)
        AttentionMaskInterface.register(ATTN_KEY, sdpa_mask)


def attention_modules(lm: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise FlashMorphError(
            f"{type(lm).__name__} has no decoder.layers[i].self_attn; flashmorph supports Llama/Qwen2/Qwen3/Mistral-family models"
        )
    return [layer.self_attn for layer in layers]


def _rotary(lm: nn.Module) -> nn.Module:
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise FlashMorphError(f"{type(lm).__name__} has no rotary_emb; set morph.qk_source=post_rope or use a RoPE model")
    return rotary


def apply_layer_modes(lm: nn.Module, config: MorphConfig, modes: list[str]) -> None:
    """Attach a LayerMorph to every attention module and switch the model to the morph attention."""
    check_family(lm.config.to_dict(), f"{type(lm).__name__}")  # before anything is changed on the model
    modules = attention_modules(lm)
    if len(modes) != len(modules):
        raise FlashMorphError(f"got {len(modes)} layer modes for a model with {len(modules)} layers")
    unknown = sorted(set(modes) - set(LAYER_MODES))
    if unknown:
        raise FlashMorphError(f"unknown layer mode(s) {unknown}; use {LAYER_MODES}")
    register_attention()
    rotary = _rotary(lm)
    for idx, (module, mode) in enumerate(zip(modules, modes)):
        module.morph = LayerMorph(layer_idx=idx, mode=mode, config=config, rotary=rotary)
    lm.config._attn_implementation = ATTN_KEY


@contextmanager
def temporary_layer_modes(lm: nn.Module, modes: list[str]):
    """Run `lm` with other layer modes inside the block (e.g. all "full" to get the original model back from a
    hybrid that shares its weights), restoring the previous modes on exit."""
    modules = attention_modules(lm)
    if len(modes) != len(modules) or any(getattr(m, "morph", None) is None for m in modules):
        raise FlashMorphError("temporary_layer_modes needs a morphed model and one mode per layer")
    previous = [m.morph.mode for m in modules]
    try:
        for module, mode in zip(modules, modes):
            module.morph.mode = mode
        yield lm
    finally:
        for module, mode in zip(modules, previous):
            module.morph.mode = mode


class MorphableLM(nn.Module):
    """A frozen causal LM plus the gates that mix softmax and linear attention in every layer."""

    def __init__(self, lm: nn.Module, config: MorphConfig):
        super().__init__()
        config.validate()
        self.lm = lm
        self.morph_config = config
        shape = ModelShape.from_config(lm.config)
        num_layers = shape.num_layers
        num_heads = shape.num_heads if config.gate_granularity == "head" else None
        self.gates = MorphGates(num_layers, num_heads, config.gate_init)
        apply_layer_modes(lm, config, ["mixed"] * num_layers)
        lm.requires_grad_(False)

    def hidden_states(self, input_ids, position_ids=None, gate_values=None):
        """Final hidden states [B, T, hidden] and the gate values used. gate_values overrides the learned gates."""
        if gate_values is None:
            gate_values = self.gates()
        decoder = self.lm.get_decoder()
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, morph_gates=gate_values)
        return out.last_hidden_state, gate_values

    def forward(self, input_ids, labels=None, position_ids=None, gate_values=None, shift_labels=None):
        """What the retrieval loss needs (training/losses/retrieval.py): the final hidden states of the answer tokens
        only, so the LM head never builds T x vocab logits.

        labels follow HF's convention (-100 = ignored, the shift happens here); or pass `shift_labels`, already
        shifted (token t's target at t), as a sequence-parallel shard must: its last target is on the next shard.
        Returns a dict with `hidden` [N, hidden] (the N answer tokens'), `targets` [N] and `gate_values`.
        """
        if (labels is None) == (shift_labels is None):
            raise FlashMorphError(
                "MorphableLM.forward needs labels or shift_labels (one of them); use .logits() for plain inference"
            )
        hidden, gate_values = self.hidden_states(input_ids, position_ids, gate_values)
        if shift_labels is None:
            targets, hidden = labels[:, 1:], hidden[:, :-1]
        else:
            targets = shift_labels
        answer = targets != -100  # [B, T-1], or [B, T] for shift_labels
        return {"hidden": hidden[answer], "targets": targets[answer], "gate_values": gate_values}

    def logits(self, input_ids, position_ids=None, gate_values=None) -> torch.Tensor:
        """Full logits [B, T, vocab]; for tests and short evaluation only."""
        hidden, _ = self.hidden_states(input_ids, position_ids, gate_values)
        return self.lm.get_output_embeddings()(hidden)


def morph_model(lm: nn.Module, config: MorphConfig | None = None) -> MorphableLM:
    """Freeze `lm` and wrap it with gates; every layer becomes a gate-weighted softmax/linear mix."""
    return MorphableLM(lm, config or MorphConfig())
