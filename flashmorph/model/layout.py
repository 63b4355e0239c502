"""Layer modes of a hybrid ("full" or "linear" per layer) from hybrid.json, a parsed dict or a list, checked against a
model's layer count. No torch import, so recipes and tools check a layout before any model is built."""

from pathlib import Path

from flashmorph.errors import ConfigError
from flashmorph.io.json_file import read_json

HYBRID_MODES = ("full", "linear")
_LAYOUT_FIX = "write it with tools/discretize_gates.py"


def check_layout(layer_modes, num_layers: int | None = None, where: str = "layout") -> list[str]:
    """A list of "full"/"linear", one per layer; anything else is a one-line ConfigError naming `where`."""
    if not isinstance(layer_modes, (list, tuple)) or not layer_modes:
        raise ConfigError(f"{where} must list one of {HYBRID_MODES} per layer; {_LAYOUT_FIX}")
    for idx, mode in enumerate(layer_modes):
        if mode not in HYBRID_MODES:
            raise ConfigError(f"{where}: layer {idx} is {mode!r}; each layer must be one of {HYBRID_MODES}")
    if num_layers is not None and len(layer_modes) != num_layers:
        raise ConfigError(
            f"{where} has {len(layer_modes)} layers but the model has {num_layers}; use the layout made for this model"
        )
    return list(layer_modes)


def _check_full_layers(full_layers, modes: list[str], where: str) -> None:
    """hybrid.json repeats the kept layers as `full_layers`; a file whose two lists disagree was edited by hand or
    made for another model, and which of the two is meant cannot be known: refuse it."""
    kept = [idx for idx, mode in enumerate(modes) if mode == "full"]
    if not isinstance(full_layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in full_layers):
        raise ConfigError(f"{where}: full_layers={full_layers!r} must be a list of layer indices; {_LAYOUT_FIX}")
    outside = [i for i in full_layers if not 0 <= i < len(modes)]
    if outside:
        raise ConfigError(f"{where}: full_layers names layer {outside[0]}, but layer_types describes {len(modes)} "
                          f"layers (0..{len(modes) - 1}); {_LAYOUT_FIX}")
    if sorted(full_layers) != kept:
        raise ConfigError(f"{where}: full_layers={full_layers} disagrees with layer_types (which keep {kept}); "
                          f"{_LAYOUT_FIX}")


def parse_layout(data, num_layers: int | None = None, where: str = "layout") -> list[str]:
    """Layer modes from a parsed hybrid.json (its "layer_types", or "layers"), a layout object with
    `to_dict()` (flashmorph.selection's HybridLayout), or a plain list."""
    if hasattr(data, "to_dict"):
        data = data.to_dict()
    if isinstance(data, dict):
        key = next((k for k in ("layer_types", "layers") if k in data), None)
        if key is None:
            raise ConfigError(f"{where} has no 'layer_types' list of {HYBRID_MODES}; {_LAYOUT_FIX}")
        for idx, row in enumerate(data.get("full_heads") or []):
            if isinstance(row, list) and any(row) and not all(row):
                raise ConfigError(
                    f"{where}: layer {idx} keeps softmax in some heads only; head-level hybrids cannot run as a "
                    "hybrid model yet, discretize by layer"
                )
        modes = check_layout(data[key], None, where)
        if data.get("full_layers") is not None:
            _check_full_layers(data["full_layers"], modes, where)
        return check_layout(modes, num_layers, where)
    return check_layout(data, num_layers, where)


def read_layout(path: str | Path, num_layers: int | None = None) -> list[str]:
    """Layer modes from a hybrid.json file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"layout {path} does not exist; {_LAYOUT_FIX}")
    data = read_json(path, f"layout {path}", _LAYOUT_FIX)
    return parse_layout(data, num_layers, where=str(path))
