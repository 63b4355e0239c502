"""Import a CLI script under tools/ or launcher/ as a module, so tests call its main() in-process."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
LAUNCHERS = ROOT / "launcher"


def _load(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str):
    """tools/<name>.py as a module named <name>_tool."""
    return _load(TOOLS / f"{name}.py", f"{name}_tool")


def load_launcher(name: str):
    """launcher/<name>.py as a module named <name>_launcher."""
    return _load(LAUNCHERS / f"{name}.py", f"{name}_launcher")
