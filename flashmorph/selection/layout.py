"""The hybrid layout (`hybrid.json`): which layers (or heads) keep softmax attention, how they were chosen,
and what the choice cost. Validated on load, written atomically."""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashmorph.errors import ConfigError, check_choice
from flashmorph.io.atomic import atomic_write_text

LAYOUT_FORMAT = "flashmorph.hybrid/1"
LAYER_TYPES = ("full", "linear")
_FIX = "regenerate it with tools/discretize_gates.py"
_KEYS = ("format", "num_layers", "layer_types", "full_layers", "full_heads", "method", "inputs", "layer_scores",
         "cost")


@dataclass
class SelectionCost:
    forward_passes: int = 0  # model forward calls the selection ran (one per batch and configuration)
    wall_seconds: float = 0.0  # wall-clock time of the selection itself, model loading excluded
    tokens: int = 0  # tokens pushed through the model, summed over all forward passes


@dataclass
class HybridLayout:
    layer_types: list[str]  # per layer: "full" (softmax) or "linear"
    method: str  # how the layout was chosen: gates, threshold, periodic, leave_one_out, kl, nll, random
    inputs: dict[str, Any] = field(default_factory=dict)  # what the method was given (budget, paths, seed, ...)
    cost: SelectionCost = field(default_factory=SelectionCost)
    full_heads: list[list[bool]] | None = None  # head-level hybrids: [layer][head] True = softmax head
    layer_scores: list[float] | None = None  # per-layer score the method ranked by (higher = keep softmax)
    source: str = field(default="hybrid layout", repr=False, compare=False)  # file it came from, named in errors

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def full_layers(self) -> list[int]:
        """Indices of the layers that keep softmax attention (any head, for head-level layouts), ascending."""
        return [i for i, kind in enumerate(self.layer_types) if kind == "full"]

    @property
    def is_head_level(self) -> bool:
        return self.full_heads is not None

    def validate(self) -> None:
        """One-line ConfigError on the first inconsistency, naming `source`."""
        where = self.source
        if not isinstance(self.layer_types, list) or not self.layer_types:
            raise ConfigError(f"{where}: layer_types must be a non-empty list of {LAYER_TYPES}; {_FIX}")
        for i, kind in enumerate(self.layer_types):
            check_choice(f"{where}: layer_types[{i}]", kind, LAYER_TYPES)
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"{where}: method must be a non-empty string; {_FIX}")
        if not isinstance(self.inputs, dict):
            raise ConfigError(f"{where}: inputs must be a mapping; {_FIX}")
        try:
            json.dumps(self.inputs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: inputs must hold JSON values only ({err}); "
                              "pass str/int/float/list/dict") from None
        if not isinstance(self.cost, SelectionCost):
            raise ConfigError(f"{where}: cost must be a SelectionCost; {_FIX}")
        if self.full_heads is not None:
            self._validate_heads(where)
        if self.layer_scores is not None:
            if not isinstance(self.layer_scores, list) or len(self.layer_scores) != self.num_layers:
                raise ConfigError(f"{where}: layer_scores must be a list of one number per layer "
                                  f"({self.num_layers}); {_FIX}")
            if not all(_is_number(s) and math.isfinite(s) for s in self.layer_scores):
                raise ConfigError(f"{where}: layer_scores must be finite numbers; {_FIX}")

    def _validate_heads(self, where: str) -> None:
        heads = self.full_heads
        if not isinstance(heads, list) or len(heads) != self.num_layers:
            count = len(heads) if isinstance(heads, list) else type(heads).__name__
            raise ConfigError(f"{where}: full_heads has {count} rows for {self.num_layers} layers; {_FIX}")
        widths = {len(row) if isinstance(row, list) else -1 for row in heads}
        if len(widths) != 1 or widths.pop() < 1:
            raise ConfigError(f"{where}: full_heads must hold one equal-length list of booleans per layer; {_FIX}")
        for i, row in enumerate(heads):
            if not all(isinstance(v, bool) for v in row):
                raise ConfigError(f"{where}: full_heads[{i}] must hold only true/false; {_FIX}")
            # a layer needs a KV cache as soon as one head keeps softmax, so that is what "full" means
            expected = "full" if any(row) else "linear"
            if self.layer_types[i] != expected:
                raise ConfigError(f"{where}: layer_types[{i}]={self.layer_types[i]!r} disagrees with full_heads[{i}] "
                                  f"(a layer is 'full' iff any head is); {_FIX}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "num_layers": self.num_layers,
            "layer_types": list(self.layer_types),
            "full_layers": self.full_layers,  # derived; written so a reader sees the choice at a glance
            "full_heads": self.full_heads,
            "method": self.method,
            "inputs": self.inputs,
            "layer_scores": self.layer_scores,
            "cost": {"forward_passes": self.cost.forward_passes, "wall_seconds": self.cost.wall_seconds,
                     "tokens": self.cost.tokens},
        }

    def to_json(self) -> str:
        """One key per line, each value on one line: a 80-layer layout stays readable and diffable."""
        items = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in self.to_dict().items()]
        return "{\n" + ",\n".join(items) + "\n}\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "hybrid layout", num_layers: int | None = None) -> "HybridLayout":
        """Parse and validate; `num_layers` (a model's layer count) is checked against the layout when given."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a JSON object; {_FIX}")
        if data.get("format") != LAYOUT_FORMAT:
            raise ConfigError(f"{where} has format {data.get('format')!r}, expected {LAYOUT_FORMAT!r}; {_FIX}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ConfigError(f"{where} has unknown key {unknown[0]!r}; valid keys: {', '.join(_KEYS)}")
        for key in ("num_layers", "layer_types", "method"):
            if key not in data:
                raise ConfigError(f"{where} lacks {key!r}; {_FIX}")
        layer_types = data["layer_types"]
        declared = data["num_layers"]
        if not isinstance(declared, int) or isinstance(declared, bool):
            raise ConfigError(f"{where}: num_layers={declared!r} must be an int; {_FIX}")
        if not isinstance(layer_types, list) or len(layer_types) != declared:
            count = len(layer_types) if isinstance(layer_types, list) else type(layer_types).__name__
            raise ConfigError(f"{where}: layer_types has {count} entries but num_layers={declared}; {_FIX}")
        if num_layers is not None and declared != num_layers:
            raise ConfigError(f"{where} describes {declared} layers but the model has {num_layers}; "
                              "use the hybrid.json made for this model")
        layout = cls(layer_types=layer_types, method=data["method"], inputs=data.get("inputs") or {},
                     cost=_parse_cost(data.get("cost"), where), full_heads=data.get("full_heads"),
                     layer_scores=data.get("layer_scores"), source=where)
        if "full_layers" in data and data["full_layers"] != layout.full_layers:
            raise ConfigError(f"{where}: full_layers={data['full_layers']} disagrees with layer_types "
                              f"(which keep {layout.full_layers}); {_FIX}")
        return layout

    @classmethod
    def from_json(cls, text: str, where: str = "hybrid layout", num_layers: int | None = None) -> "HybridLayout":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                              f"{_FIX}") from None
        return cls.from_dict(data, where, num_layers)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} already exists; pass --force to overwrite it or choose another --out")
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, num_layers: int | None = None) -> "HybridLayout":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"hybrid layout {path} does not exist; create it with tools/discretize_gates.py")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"hybrid layout {path} is unreadable ({type(err).__name__}); {_FIX}") from None
        return cls.from_json(text, where=str(path), num_layers=num_layers)


def layout_from_full_layers(num_layers: int, full_layers: list[int], method: str, **fields) -> HybridLayout:
    """A layer-level layout keeping `full_layers` as softmax; every other layer becomes linear."""
    bad = [i for i in full_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"full layer index {bad[0]} is outside [0, {num_layers}); {_FIX}")
    kept = set(full_layers)
    return HybridLayout(["full" if i in kept else "linear" for i in range(num_layers)], method, **fields)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_cost(raw: Any, where: str) -> SelectionCost:
    if raw is None:
        return SelectionCost()
    if not isinstance(raw, dict) or set(raw) - {"forward_passes", "wall_seconds", "tokens"}:
        raise ConfigError(f"{where}: cost must be an object with forward_passes, wall_seconds, tokens; {_FIX}")
    passes, seconds, tokens = raw.get("forward_passes", 0), raw.get("wall_seconds", 0.0), raw.get("tokens", 0)
    if not (isinstance(passes, int) and not isinstance(passes, bool) and passes >= 0):
        raise ConfigError(f"{where}: cost.forward_passes={passes!r} must be an int >= 0; {_FIX}")
    if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0):
        raise ConfigError(f"{where}: cost.tokens={tokens!r} must be an int >= 0; {_FIX}")
    if not (_is_number(seconds) and math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"{where}: cost.wall_seconds={seconds!r} must be a number >= 0; {_FIX}")
    return SelectionCost(passes, float(seconds), tokens)
