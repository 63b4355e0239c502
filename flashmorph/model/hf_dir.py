"""A HF model directory checked before any weight is read: config.json (keys, types, family), the safetensors headers
(present, not truncated, shapes that fit the config) and the tokenizer's ids against the vocabulary.

No torch import, so a launcher or tool refuses a bad directory in a fraction of a second, before anything is written.
"""

import json
import math
import re
from pathlib import Path

from flashmorph.errors import ConfigError
from flashmorph.model.families import SUPPORTED_MODEL_TYPES
from flashmorph.model.shape import ModelShape, read_model_config
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_REFETCH = "re-download the model or re-save it with save_pretrained"


# ---------------------------------------------------------------------------------------------------------- weights


def weight_files(model_dir: Path, where: str) -> list[Path]:
    """The safetensors files of `model_dir` (one file, or the shards its index names); ConfigError if none."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{where}: {SAFETENSORS_INDEX} is unreadable ({type(err).__name__}); {_REFETCH}") from None
        missing = [name for name in names if not (model_dir / name).is_file()]
        if missing:
            raise ConfigError(f"{where}: {SAFETENSORS_INDEX} names {missing[0]}, which is missing "
                              f"({len(missing)} of {len(names)} shards missing); {_REFETCH}")
        return [model_dir / name for name in names]
    if (model_dir / SAFETENSORS_NAME).is_file():
        return [model_dir / SAFETENSORS_NAME]
    if any((model_dir / name).is_file() for name in _PICKLE_WEIGHTS):
        raise ConfigError(f"{where} holds only pickle weights (pytorch_model.bin), which flashmorph never loads; "
                          "re-save the model as safetensors (save_pretrained) with a transformers you trust")
    raise ConfigError(f"{where} holds config.json but no weights ({SAFETENSORS_NAME} or {SAFETENSORS_INDEX}); "
                      "point it at a complete HF model directory")


def read_safetensors_header(path: Path, where: str) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from a safetensors header, after checking the file is as long as the header says.

    Reads the header only (kilobytes), so truncation is caught at once; damage inside tensor data is not.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"{size} bytes, header length {header_len}")
            header = json.loads(f.read(header_len).decode("utf-8"))
        tensors, data_end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape, dtype, (start, stop) = list(info["shape"]), info["dtype"], info["data_offsets"]
            if dtype in _DTYPE_BYTES and stop - start != math.prod(shape) * _DTYPE_BYTES[dtype]:
                raise ValueError(f"{name} spans {stop - start} bytes, not {shape} x {dtype}")
            tensors[name] = (shape, dtype)
            data_end = max(data_end, stop)
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{where}: {path.name} is not a valid safetensors file ({err}); {_REFETCH}") from None
    needed = 8 + header_len + data_end
    if size < needed:
        raise ConfigError(f"{where}: {path.name} is truncated ({size} bytes, its header needs {needed}); {_REFETCH}")
    return tensors


def _check_shapes(tensors: dict, shape: ModelShape, where: str) -> None:
    """The weights' embedding, layer count and q/k projection rows against config.json: a config copied from another
    model fails here, before from_pretrained would stop on a size mismatch (or load something wrong)."""
    hidden, d = shape.hidden_size, shape.head_dim
    expected = {
        "embed_tokens.weight": ([shape.vocab_size, hidden], "vocab_size x hidden_size"),
        "layers.0.self_attn.q_proj.weight": ([shape.num_heads * d, hidden], "num_attention_heads * head_dim x hidden_size"),
        "layers.0.self_attn.k_proj.weight": ([shape.num_kv_heads * d, hidden],
                                             "num_key_value_heads * head_dim x hidden_size"),
    }
    for name, (tensor_shape, _dtype) in tensors.items():
        for suffix, (want, what) in expected.items():
            if name.endswith(suffix) and tensor_shape != want:
                raise ConfigError(f"{where}: {name} has shape {tensor_shape} but config.json says {want} ({what}); "
                                  "the config does not belong to these weights")
    layer_ids = {int(m.group(1)) for name in tensors if (m := _LAYER.match(name))}
    if layer_ids and max(layer_ids) + 1 != shape.num_layers:
        raise ConfigError(f"{where}: the weights hold {max(layer_ids) + 1} layers but config.json says "
                          f"num_hidden_layers={shape.num_layers}; the config does not belong to these weights")


def check_weights(model_dir: str | Path, where: str, shape: ModelShape | None = None) -> None:
    """Every safetensors file present with an intact header and length; with `shape`, the tensor shapes fit it."""
    tensors = {}
    for path in weight_files(Path(model_dir), where):
        tensors.update(read_safetensors_header(path, where))
    if shape is not None:
        _check_shapes(tensors, shape, where)


# -------------------------------------------------------------------------------------------------------- tokenizer


def check_tokenizer(model_dir: str | Path, vocab_size: int, where: str) -> None:
    """A tokenizer.json whose ids reach past the model's vocabulary belongs to another model: refuse it.

    (Only tokenizer.json is read here; a sentencepiece-only tokenizer is checked when the data is built.)
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [token["id"] for token in data.get("added_tokens") or []]
        top = max((int(i) for i in ids), default=-1)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: tokenizer.json is unreadable ({type(err).__name__}); copy the model's own "
                          "tokenizer files into it") from None
    if top >= vocab_size:
        raise ConfigError(f"{where}: the tokenizer has token id {top} but config.json vocab_size={vocab_size}; the "
                          "tokenizer belongs to another model, copy the model's own tokenizer files into it")


# ------------------------------------------------------------------------------------------------------ all of them


def validate_model_dir(model_dir: str | Path, where: str | None = None, morphable: bool = True) -> ModelShape | None:
    """Every check that needs no weights, in one pass; returns the model shape (None when not `morphable`).

    morphable: the directory must hold a supported family (families.py) whose config has every key flashmorph
    reads; otherwise (evaluation of any plain HF model) only the config, weights and tokenizer are checked.
    """
    where = where or str(model_dir)
    if not Path(model_dir).is_dir():
        raise ConfigError(f"{where} does not exist or is not a directory; give a local HF model directory")
    config = read_model_config(model_dir, where)
    shape = ModelShape.from_hf_config(config, where) if morphable else None
    check_weights(model_dir, where, shape)
    vocab_size = shape.vocab_size if shape else config.get("vocab_size")
    if isinstance(vocab_size, int) and not isinstance(vocab_size, bool):
        check_tokenizer(model_dir, vocab_size, where)
    return shape


def check_eval_model_dir(model_dir: str | Path, where: str | None = None) -> dict:
    """`validate_model_dir` for evaluation, which scores any HF causal LM: a supported family (or a flashmorph hybrid
    export) gets every check, another family only the config, weight and tokenizer checks. Returns config.json."""
    where = where or str(model_dir)
    if not Path(model_dir).is_dir():
        raise ConfigError(f"{where} does not exist or is not a directory; give a local HF model directory")
    config = read_model_config(model_dir, where)
    morphable = "flashmorph" in config or config.get("model_type") in SUPPORTED_MODEL_TYPES
    validate_model_dir(model_dir, where, morphable=morphable)
    return config
