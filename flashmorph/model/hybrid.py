"""Apply a hybrid layout (one "full" or "linear" per layer) to a HF causal LM so that it runs and generates.

Full layers run softmax attention only, linear layers the Liger GLA only (the registered "morph" function).
A forward pre-hook on the decoder gives every cached forward a hybrid cache and hands it to that function.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch
from torch import nn

from flashmorph import __version__
from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.model.config import MorphConfig
from flashmorph.model.hybrid_cache import HybridCache, install_recurrent_layers
from flashmorph.model.layout import HYBRID_MODES, check_layout, parse_layout, read_layout  # noqa: F401 (re-exported)
from flashmorph.model.morph import apply_layer_modes

SECTION_KEY = "flashmorph"  # the model config's attribute (and config.json key) that records the hybrid
SECTION_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# The config section that records a hybrid (saved in config.json by save_pretrained)


def hybrid_section(layer_modes: list[str], config: MorphConfig) -> dict:
    """What `apply_hybrid_layout` records on the model config: layer types, linear-branch settings, version."""
    return {
        "format": SECTION_FORMAT,
        "version": __version__,
        "layer_types": list(layer_modes),
        "morph": dataclasses.asdict(config),
    }


def read_hybrid_section(section, num_layers: int | None = None,
                        where: str = "config.json") -> tuple[list[str], MorphConfig]:
    """Layer modes and MorphConfig from a `flashmorph` config section; ConfigError if it is malformed."""
    fix = "re-export the model with tools/export.py"
    if not isinstance(section, dict):
        raise ConfigError(f"{where} has no '{SECTION_KEY}' section; it is not a flashmorph hybrid, {fix}")
    if section.get("format") != SECTION_FORMAT:
        raise ConfigError(
            f"{where}: {SECTION_KEY}.format={section.get('format')!r}, this flashmorph reads {SECTION_FORMAT}; "
            "use the flashmorph version that wrote it"
        )
    modes = check_layout(section.get("layer_types"), num_layers, where=f"{where}: {SECTION_KEY}.layer_types")
    morph = section.get("morph") or {}
    known = {f.name for f in dataclasses.fields(MorphConfig)}
    unknown = sorted(set(morph) - known) if isinstance(morph, dict) else ["<not a mapping>"]
    if unknown:
        raise ConfigError(f"{where}: {SECTION_KEY}.morph has unknown field {unknown[0]!r}; valid: {sorted(known)}")
    config = MorphConfig(**morph)
    config.validate()
    return modes, config


# ----------------------------------------------------------------------------------------------------------
# Applying a layout


def apply_hybrid_layout(lm: nn.Module, layout, config: MorphConfig | None = None) -> nn.Module:
    """Turn `lm` into a hybrid in place and return it: `layout` is a list of "full"/"linear", a parsed
    hybrid.json, or its path. The layout and `config` are recorded in `lm.config.flashmorph`, so
    `save_pretrained` writes them and `load_hybrid` restores them."""
    num_layers = lm.config.num_hidden_layers
    if isinstance(layout, (str, Path)):
        modes = read_layout(layout, num_layers)
    else:
        modes = parse_layout(layout, num_layers)
    config = config or MorphConfig()
    config.validate()
    apply_layer_modes(lm, config, modes)
    decoder = lm.get_decoder()
    previous = getattr(decoder, "_flashmorph_cache_hook", None)
    if previous is not None:
        previous.remove()
    decoder._flashmorph_cache_hook = decoder.register_forward_pre_hook(
        _cache_binder(modes, _cache_argument(decoder)), with_kwargs=True
    )
    setattr(lm.config, SECTION_KEY, hybrid_section(modes, config))
    return lm


def hybrid_layout(lm: nn.Module) -> list[str]:
    """The layer modes `apply_hybrid_layout` gave `lm`."""
    section = getattr(lm.config, SECTION_KEY, None)
    if section is None:
        raise FlashMorphError(f"{type(lm).__name__} is not a hybrid model; call apply_hybrid_layout first")
    return list(section["layer_types"])


def make_hybrid_cache(lm: nn.Module) -> HybridCache:
    """An empty hybrid cache for `lm`, e.g. to pass to `generate(..., cache=...)` and inspect afterwards."""
    return HybridCache(lm.config, hybrid_layout(lm))


def _cache_argument(decoder: nn.Module) -> str:
    # transformers 5.x renamed the decoder's `past_key_values` argument to `cache`; support both
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _cache_binder(layer_modes: list[str], cache_arg: str):
    """Decoder pre-hook: make the forward's cache hybrid (in place, or a new one where the model would build
    its own) and pass it to the attention function as the `morph_cache` kwarg, which transformers forwards."""
    has_linear = "linear" in layer_modes

    def bind(decoder: nn.Module, args: tuple, kwargs: dict):
        name = next((n for n in ("cache", "past_key_values") if kwargs.get(n) is not None), None)
        if name is not None:
            cache = install_recurrent_layers(kwargs[name], layer_modes)
        else:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(decoder.config, "use_cache", True)
            if not use_cache:
                return None  # a full-sequence forward: linear layers run without a state
            cache = kwargs[cache_arg] = HybridCache(decoder.config, layer_modes)
        mask = kwargs.get("attention_mask")
        if (has_linear and cache.get_seq_length() == 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2
                and not bool(mask.all())):
            # a recurrent state cannot skip padding tokens the way a masked softmax does
            raise FlashMorphError(
                "linear layers cannot skip padding tokens; generate without padding (one prompt at a time, or "
                "prompts of equal length)"
            )
        kwargs["morph_cache"] = cache
        return args, kwargs

    return bind
