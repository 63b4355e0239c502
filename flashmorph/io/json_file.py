"""Reading a user's JSON file (config.json, hybrid.json) with one-line errors; torch-free, so validation stays fast."""

import json
from pathlib import Path

from flashmorph.errors import ConfigError


def read_json(path: Path, label: str, fix: str):
    """The parsed contents of `path`; an unreadable, non-UTF-8 or malformed file is a ConfigError
    "<label> is not readable JSON (<error type>); <fix>"."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{label} is not readable JSON ({type(err).__name__}); {fix}") from None
