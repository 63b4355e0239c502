"""The config.json of a HF model directory, read before any weight is (no torch import, so validation stays fast)."""

import json
from pathlib import Path

from flashmorph.errors import ConfigError


def read_model_config(model_dir: str | Path, name: str | None = None) -> dict:
    """The raw config.json of `model_dir` as a dict; `name` is how errors call the directory ("--model X")."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{name or model_dir} holds no config.json; point it at a HF model directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not readable JSON ({type(err).__name__}); fix or replace it") from None
