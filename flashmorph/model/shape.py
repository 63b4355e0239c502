"""The one ModelShape: a decoder's layer, head and width counts, read from a HF config.json (or a teacher section).

No torch import: recipes, the estimator, reshard and tools read shapes before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flashmorph.errors import ConfigError
from flashmorph.io.json_file import read_json
from flashmorph.model.families import check_family

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama/Qwen/Mistral-family decoder that memory, TP splits and layouts depend on."""

    name: str  # what errors call the model (a preset name, a directory, "teacher")
    num_layers: int  # decoder layers (num_hidden_layers)
    hidden_size: int  # model width
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int  # per-head width (config head_dim, else hidden_size / num_heads)
    intermediate_size: int  # MLP width
    vocab_size: int  # embedding rows
    tie_embeddings: bool = False  # lm_head shares the embedding
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    qkv_bias: bool = False  # Qwen2: biases on q/k/v
    model_type: str = ""  # config.json model_type ("" for a preset without one)

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one decoder layer, before TP."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def hf_config_kwargs(self) -> dict:
        """The config.json keys of this shape (the inverse of from_hf_config), to build a transformers config."""
        return {"num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
                "tie_word_embeddings": self.tie_embeddings}

    @classmethod
    def from_hf_config(cls, config: dict, where: str = "model", morphable: bool = True) -> ModelShape:
        """The shape of a config.json dict (a multimodal config's `text_config` when the top level lacks the layers).

        Absent or null optional keys take the Llama/Qwen config classes' defaults: num_key_value_heads = heads,
        head_dim = hidden/heads, intermediate_size = 4 x hidden, tie_word_embeddings = False. `morphable`:
        refuse families flashmorph does not morph (off for the estimator, which sizes any such decoder).
        """
        if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        if morphable:
            check_family(config, where)
        layers = _int_field(config, "num_hidden_layers", where)
        heads = _int_field(config, "num_attention_heads", where)
        hidden = _int_field(config, "hidden_size", where)
        kv_heads = _int_field(config, "num_key_value_heads", where, default=heads)
        if heads % kv_heads:
            raise ConfigError(f"{where}: config.json num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}; fix one of them")
        if config.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"{where}: config.json hidden_size={hidden} is not divisible by "
                              f"num_attention_heads={heads} and there is no head_dim; add head_dim")
        model_type = config.get("model_type")
        model_type = model_type if isinstance(model_type, str) else ""
        return cls(
            name=where,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=_int_field(config, "head_dim", where, default=hidden // heads),
            intermediate_size=_int_field(config, "intermediate_size", where, default=4 * hidden),
            vocab_size=_int_field(config, "vocab_size", where),
            tie_embeddings=bool(config.get("tie_word_embeddings") or False),
            qk_norm=model_type.startswith("qwen3"),
            qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, where: str | None = None,
                       morphable: bool = True) -> ModelShape:
        """The shape of a HF model directory's config.json (the config only; hf_dir.validate_model_dir also checks
        weights and tokenizer and returns the same shape)."""
        where = where or str(model_dir)
        return cls.from_hf_config(read_model_config(model_dir, where), where, morphable)

    @classmethod
    def from_config(cls, config, where: str | None = None) -> ModelShape:
        """The shape of a transformers config object (its text config), e.g. a loaded model's `lm.config`."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls.from_hf_config(config.to_dict(), where or f"{config.model_type} config", morphable=False)

    @classmethod
    def from_teacher(cls, teacher) -> ModelShape:
        """The shape of the embedded teacher a recipe's `teacher` section (config.TeacherConfig) describes."""
        return cls(name="teacher", num_layers=teacher.num_layers, hidden_size=teacher.hidden_size,
                   num_heads=teacher.num_heads, num_kv_heads=teacher.num_kv_heads,
                   head_dim=teacher.hidden_size // teacher.num_heads,
                   intermediate_size=teacher.intermediate_size or 4 * teacher.hidden_size,
                   vocab_size=teacher.vocab_size, model_type=teacher.family,
                   qk_norm=teacher.family.startswith("qwen3"), qkv_bias=teacher.family == "qwen2")


def read_model_config(model_dir: str | Path, name: str | None = None) -> dict:
    """The raw config.json of `model_dir` as a dict; `name` is how errors call the directory ("--model X")."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{name or model_dir} holds no config.json; point it at a HF model directory")
    config = read_json(path, str(path), "fix or replace it")
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}, not an object of model settings; fix or "
                          "replace it")
    return config


def _int_field(config: dict, key: str, where: str, default=None) -> int:
    value = config.get(key)
    if value is None:  # absent or null (e.g. Mistral's "head_dim": null): the family's default, where it has one
        value = default
    if value is None:
        raise ConfigError(f"{where}: config.json has no {key}; add it (the value of the model the weights belong to)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: config.json {key}={value!r} must be a positive integer (write it unquoted)")
    return value
