"""The one state-dict adapter: HF weight names and shapes <-> TP-shard names and split dims, and ZeRO-3 names -> HF.

Every other reshard module asks this one how a weight is named, split and merged (like torchtitan's state_dict_adapter);
the TP rules themselves live with tensor parallelism (flashmorph/parallel/tp_rules.py) and are re-exported here.
"""

import torch

from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.model.shape import ModelShape  # noqa: F401 (re-exported: the sizes reshard checks)
from flashmorph.parallel.tp_rules import (  # noqa: F401 (re-exported: reshard asks this one adapter)
    COLUMN,
    REPLICATED,
    RESHARD_NAMES,
    ROW,
    VOCAB,
    TPRule,
    check_split_shape,
    check_tp_size,
    hf_to_tp_name,
    layout_dims,
    merge_from_tp,
    split_for_tp,
    tp_piece_shape,
    tp_rule,
    tp_to_hf_name,
)


def zero3_to_hf_names(zero_names: list[str], hf_names: list[str], aliases: set[str] = frozenset()) -> tuple[dict, list]:
    """Map ZeRO-3 parameter names (the engine module's, e.g. `lm.model.layers.0...` under MorphableLM) to HF names.

    Returns ({hf_name: zero_name}, extra zero names such as gates or adapters). Every HF name must be found, once,
    under one common prefix; `aliases` (tied copies such as lm_head.weight, which HF files omit) are not extras.
    """
    known = set(hf_names) | set(aliases)
    by_prefix: dict[str, dict[str, str]] = {}
    for name in zero_names:
        for hf in _suffixes_in(name, known):
            by_prefix.setdefault(name[: len(name) - len(hf)], {})[hf] = name
    if not by_prefix:
        raise CheckpointError(f"the ZeRO-3 checkpoint holds none of the model's weights (e.g. {hf_names[0]}); it was "
                              "probably saved without frozen weights (gate search saves only the gates): use the "
                              "original HF model directory instead")
    prefix = max(by_prefix, key=lambda p: len(by_prefix[p]))
    found = by_prefix[prefix]
    missing = [hf for hf in hf_names if hf not in found]
    if missing:
        raise CheckpointError(f"the ZeRO-3 checkpoint lacks {len(missing)} of the model's {len(hf_names)} weights "
                              f"(e.g. {prefix}{missing[0]}); it was probably saved without frozen weights, or for "
                              "another model than the config")
    mapping = {hf: found[hf] for hf in hf_names}
    used = set(found.values())
    return mapping, [name for name in zero_names if name not in used]


def _suffixes_in(name: str, known: set[str]):
    parts = name.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in known:
            yield candidate


def hf_weights(config) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], set[str]]:
    """({name: (shape, dtype)} of every tensor a HF checkpoint of `config` holds, in model order; tied aliases).

    Built on the meta device, so it costs no memory even for a 70B config.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config_dtype(config))
    weights = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
    every_name = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name in persistent:
            weights[name] = (tuple(buffer.shape), buffer.dtype)
    return weights, every_name - set(weights)


def config_dtype(config) -> torch.dtype:
    """The model's own dtype from its config (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"config dtype {dtype!r} is not a floating-point torch dtype; fix dtype in config.json")
    return dtype
