"""Packaging: what a fresh install sees. No file or folder of ours may be importable under the name of a package in
the dependency tree (a `bench/kernels.py` once shadowed the `kernels` package that transformers imports), and the
two dependency lists a user may install from say the same thing."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders whose modules land on sys.path when a script there runs by its path (python tools/x.py puts tools/ first).
SCRIPT_DIRS = ("bench", "launcher", "tools", "scripts", "tests")


def installed_top_level_names() -> dict[str, str]:
    """{top-level import name: distribution} for every installed distribution (from top_level.txt or RECORD)."""
    names: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        top = dist.read_text("top_level.txt")
        candidates = set(top.split()) if top else set()
        for entry in dist.files or ():
            first = entry.parts[0] if entry.parts else ""
            if first.endswith((".dist-info", ".egg-info", ".data")) or first in ("..", "__pycache__"):
                continue
            candidates.add(first[:-3] if first.endswith(".py") else first)
        for name in candidates:
            if name.isidentifier() and not name.startswith("_"):
                names.setdefault(name, dist_name)
    return names


def our_module_names(root: Path) -> dict[str, Path]:
    """Every module or package name a script of ours can import by its bare name."""
    ours: dict[str, Path] = {}
    for folder in (root, *(root / d for d in SCRIPT_DIRS)):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith((".", "_")):
                continue
            if path.suffix == ".py":
                ours[path.stem] = path
            elif path.is_dir() and ((path / "__init__.py").exists() or folder == root):
                ours[path.name] = path
    return ours


def shadowing(root: Path, installed: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{name: (our path, the distribution it shadows)}; our own package and the tests folder are not clashes."""
    return {name: (str(path.relative_to(root)), installed[name]) for name, path in our_module_names(root).items()
            if name in installed and installed[name].lower() != "flashmorph"
            and not (name == "tests" and path == root / "tests")}


def test_no_file_of_ours_shadows_an_installed_package():
    installed = installed_top_level_names()
    assert "transformers" in installed and "torch" in installed  # the scan itself works
    clashes = shadowing(ROOT, installed)
    assert not clashes, f"files of ours named like installed packages (rename them): {clashes}"


def test_the_shadowing_scan_finds_a_planted_clash(tmp_path):
    """The check above can fail: a file named like an installed package (bench/yaml.py) is caught."""
    installed = installed_top_level_names()
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "yaml.py").write_text("")
    (tmp_path / "bench" / "selection_cost.py").write_text("")
    assert shadowing(tmp_path, installed) == {"yaml": ("bench/yaml.py", installed["yaml"])}


def _requirement_names(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out[re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower()] = line.replace(" ", "")
    return out


def test_requirements_txt_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
    listed = _requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert listed == declared


def test_every_runtime_dependency_is_declared():
    """Packages our code imports at run time (directly, or that transformers' integrations require) are declared."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(_requirement_names(project["dependencies"]))
    for needed in ("accelerate", "peft", "deepspeed", "transformers", "safetensors", "datasets", "tensorboard",
                   "numpy"):
        assert needed in declared, f"{needed} is used at run time but not declared in pyproject.toml"
        importlib.metadata.version(needed)  # and installed by that declaration


def test_every_package_our_code_imports_is_declared():
    """Each third-party top-level module imported anywhere in flashmorph/ (module or function level) belongs to a
    distribution pyproject declares (a dependency of a declared package is not enough: numpy once slipped by that way).
    A module that is not installed here (an optional extra) counts by its name, with _ read as -."""
    import ast
    import sys

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(_requirement_names(project["dependencies"]))
    optional = {name for extra in project["optional-dependencies"].values() for name in _requirement_names(extra)}
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for path in (ROOT / "flashmorph").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top == "flashmorph" or top in sys.stdlib_module_names:
                    continue
                dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not dists & (declared | optional):
                    missing.setdefault(top, str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
