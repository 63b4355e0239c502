"""The model families flashmorph morphs, and the config.json check that refuses every other model before its weights load.

One table for every entry point (recipes, tools, `morph_model`, `apply_hybrid_layout`, `load_hybrid`); no torch
import, so launchers can ask it while validating a recipe.
"""

from dataclasses import dataclass

from flashmorph.errors import ConfigError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (the linear branch reads q/k after it)
    note: str  # what a reader should know about this family's morph


# Each entry is proven by tests/model/test_families.py: with every gate at softmax (and as a hybrid with every layer
# full, in a forward and in generate) the morphed model gives the original model's logits, for every softmax_impl.
FAMILIES = {
    "llama": Family("llama", qk_norm=False, note="Llama 2/3/3.1 (rope_scaling llama3 included)"),
    "qwen2": Family("qwen2", qk_norm=False, note="Qwen2/2.5 (q/k/v biases; sliding window through the mask)"),
    "qwen3": Family("qwen3", qk_norm=True, note="Qwen3 dense (q/k RMSNorm before RoPE)"),
    "mistral": Family("mistral", qk_norm=False, note="Mistral (sliding window through the mask)"),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# model types people try, with the reason a morph of them would be wrong; the rest get the generic message
_REFUSED = {
    "gemma2": "its attention-logit and final-logit softcapping would be dropped by the morph attention",
    "phi3": "it fuses q/k/v into one qkv_proj, which the linear branch cannot read",
    "qwen2_moe": "its MoE blocks are untested with the morph",
    "qwen3_moe": "its MoE blocks are untested with the morph",
    "mixtral": "its MoE blocks are untested with the morph",
    "gpt_oss": "its attention sinks would be dropped by the morph attention",
}
# config.json keys that change attention or logits in a way the morph attention does not reproduce, when set
_UNSUPPORTED_FEATURES = {
    "attn_logit_softcapping": "attention-logit softcapping",
    "final_logit_softcapping": "final-logit softcapping",
}


def supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def check_family(config: dict, where: str) -> Family:
    """The Family of a parsed config.json; a one-line ConfigError naming `where` for anything else.

    `where` says what the config belongs to (e.g. "model.path=/models/x"); the message names the key and the fix.
    """
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where}: config.json has no model_type; add \"model_type\": one of {supported_list()}")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        reason = _REFUSED.get(model_type) if isinstance(model_type, str) else None
        why = f" ({reason})" if reason else ""
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported{why}; flashmorph morphs "
                          f"{supported_list()}")
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(key) not in (None, False, 0, 0.0):
            raise ConfigError(f"{where}: config.json sets {key}={config[key]!r} ({feature}), which the morph attention "
                              f"would drop; flashmorph morphs {supported_list()} models without it")
    return FAMILIES[model_type]
