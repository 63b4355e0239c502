"""The user's DeepSpeed JSON (parallel.deepspeed_config), read and checked before any process group or file exists."""

import json
from pathlib import Path

from flashmorph.errors import ConfigError

_DS_DOCS = "see https://www.deepspeed.ai/docs/config-json/"


def read_deepspeed_json(path: str | Path, where: str = "parallel.deepspeed_config") -> dict:
    """The JSON object in `path`; a one-line ConfigError for a missing file, bad JSON or a non-object."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}={path} does not exist; give a DeepSpeed JSON file or null")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}={path} is unreadable ({type(err).__name__}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}={path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                          "fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}={path} holds a JSON {type(data).__name__}; it must be an object of DeepSpeed "
                          f"settings, e.g. {{\"zero_optimization\": {{\"stage\": 3}}}}")
    return data


def check_deepspeed_values(settings: dict, where: str = "parallel.deepspeed_config") -> None:
    """DeepSpeed's own (pydantic) checks of `settings`, run now instead of inside deepspeed.initialize after the
    run directory exists. Imports deepspeed, so only call it when the user gave a DeepSpeed JSON.

    Batch sizes are left out: DeepSpeed checks them against the world size, which only the launched job knows.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {key: value for key, value in settings.items()
             if key not in ("train_batch_size", "gradient_accumulation_steps")}
    probe.setdefault("train_micro_batch_size_per_gpu", 1)
    try:
        DeepSpeedConfig(probe)
    except Exception as err:  # pydantic ValidationError, or the AttributeError/TypeError DeepSpeed hits on odd types
        raise ConfigError(f"{where}: DeepSpeed refuses it ({_first_problem(err)}); fix that value, {_DS_DOCS}") from None


def _first_problem(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic: name the field path and the reason
        try:
            first = errors()[0]
            section = getattr(err, "title", "")
            loc = ".".join(str(part) for part in first.get("loc", ()))
            return f"{section} {loc}: {first.get('msg')}, got {first.get('input')!r}".strip()
        except (IndexError, TypeError, KeyError):
            pass
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
