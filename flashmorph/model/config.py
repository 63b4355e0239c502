"""Settings of the morphed attention: how gates are shaped and how the linear branch is computed."""

from dataclasses import dataclass

from flashmorph.errors import ConfigError, check_choice

DTYPES = ("float32", "bfloat16", "float16")  # the recipe's model.dtype names (torch dtypes: model.load)
LINEAR_BACKENDS = ("auto", "naive", "fla")
QK_SOURCES = ("pre_rope", "post_rope")
SOFTMAX_IMPLS = ("sdpa", "eager")


@dataclass
class MorphConfig:
    gate_granularity: str = "layer"  # "layer": one gate per layer; "head": one per layer and query head
    gate_init: float = 0.88  # initial gate value sigmoid(logit) in (0, 1); near 1 = start close to softmax
    linear_backend: str = "auto"  # "auto" (fla on CUDA, naive torch on CPU), "naive" or "fla"
    qk_source: str = "pre_rope"  # Liger uses q/k before RoPE; "post_rope" feeds the rotated q/k instead
    softmax_impl: str = "sdpa"  # transformers attention function for the softmax branch
    decay_normalizer: float = 16.0  # forget gate = logsigmoid(k) / decay_normalizer (Liger's value)

    def validate(self) -> None:
        if self.gate_granularity not in ("layer", "head"):
            raise ConfigError(f"morph.gate_granularity={self.gate_granularity!r} is unknown; use 'layer' or 'head'")
        if not 0.0 < self.gate_init < 1.0:
            raise ConfigError(f"morph.gate_init={self.gate_init} must lie strictly between 0 and 1")
        check_choice("morph.linear_backend", self.linear_backend, LINEAR_BACKENDS)
        check_choice("morph.qk_source", self.qk_source, QK_SOURCES)
        check_choice("morph.softmax_impl", self.softmax_impl, SOFTMAX_IMPLS)
        if self.decay_normalizer <= 0:
            raise ConfigError(f"morph.decay_normalizer={self.decay_normalizer} must be > 0 (Liger uses 16)")
