"""Entry points: every command lives in flashmorph/cli/ with a `main(argv=None) -> int`, is declared as a console
script in pyproject.toml, and keeps a thin shim under launcher/ or tools/ that users run by path."""

import ast
import importlib
import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIM_DIRS = ("launcher", "tools")
MAX_SHIM_LINES = 10


def declared_scripts(root: Path = ROOT) -> dict[str, str]:
    """{console script: "module:function"} from pyproject.toml."""
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]


def commands(root: Path = ROOT) -> set[str]:
    """The command modules of flashmorph/cli/ (a leading underscore marks a shared helper, not a command)."""
    return {p.stem for p in (root / "flashmorph" / "cli").glob("*.py") if not p.stem.startswith("_")}


def shims(root: Path = ROOT) -> list[Path]:
    return sorted(p for folder in SHIM_DIRS for p in (root / folder).glob("*.py"))


def shim_problems(path: Path) -> list[str]:
    """Why `path` is not a thin shim: a docstring, `from flashmorph.cli.<its name> import main`, and
    `if __name__ == "__main__": raise SystemExit(main())`, in at most MAX_SHIM_LINES lines."""
    text = path.read_text(encoding="utf-8")
    problems = []
    if len(text.splitlines()) > MAX_SHIM_LINES:
        problems.append(f"{len(text.splitlines())} lines (at most {MAX_SHIM_LINES}): move the code to flashmorph/cli/")
    body = ast.parse(text).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    expected = [f"from flashmorph.cli.{path.stem} import main",
                "if __name__ == '__main__':\n    raise SystemExit(main())"]
    if [ast.unparse(node) for node in body] != expected:
        problems.append(f"its statements must be exactly {expected}")
    return problems


def test_every_declared_script_resolves_to_a_main():
    scripts = declared_scripts()
    assert len(scripts) >= 10
    for name, target in scripts.items():
        module_name, _, function = target.partition(":")
        assert name.startswith("flashmorph-") and module_name.startswith("flashmorph.cli."), (name, target)
        main = getattr(importlib.import_module(module_name), function)
        argv = inspect.signature(main).parameters["argv"]
        assert function == "main" and argv.default is None, f"{name}: {target} must be main(argv=None) -> int"


def test_every_command_has_one_script_and_one_shim():
    targets = sorted(target.partition(":")[0].removeprefix("flashmorph.cli.") for target in declared_scripts().values())
    assert targets == sorted(commands()), "declare each flashmorph/cli/ command once under [project.scripts]"
    assert sorted(p.stem for p in shims()) == sorted(commands()), "each command keeps its launcher/ or tools/ shim"


def test_every_shim_is_thin():
    found = {str(path.relative_to(ROOT)): shim_problems(path) for path in shims()}
    assert found and not any(found.values()), {path: problems for path, problems in found.items() if problems}


def test_the_shim_check_finds_a_fat_shim(tmp_path):
    good = (ROOT / "tools" / "export.py").read_text()
    (tmp_path / "export.py").write_text(good)
    assert shim_problems(tmp_path / "export.py") == []
    (tmp_path / "evaluate.py").write_text(good)  # imports another command than its name says
    (tmp_path / "reshard.py").write_text(good.replace("import main\n", "import main\nimport torch\n"))
    (tmp_path / "estimate.py").write_text(good.replace("export", "estimate") + "\n" * MAX_SHIM_LINES)
    assert [len(shim_problems(tmp_path / f"{name}.py")) for name in ("evaluate", "reshard", "estimate")] == [1, 1, 1]


def test_the_shims_run_by_path():
    """What users type (`python tools/x.py`, what deepspeed runs too): each shim answers --help through its command,
    without torch. One interpreter runs them all by path (runpy, as `python path` does): a process each costs more."""
    probe = ("import runpy, sys\n"
             "for path in sys.argv[1:]:\n"
             "    sys.argv = [path, '--help']\n"
             "    try:\n"
             "        runpy.run_path(path, run_name='__main__')\n"
             "    except SystemExit as stop:\n"
             "        print('exit', path, stop.code)\n"
             "print('heavy', [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules])\n")
    paths = [str(path.relative_to(ROOT)) for path in shims()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", probe, *paths], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for path in paths:
        assert f"exit {path} 0" in done.stdout and f"usage: {Path(path).name}" in done.stdout, (path, done.stdout)
    assert "heavy []" in done.stdout
    # long_context is the distill step along a length curriculum: its shim reaches that stage, not plain distill
    assert "Long-context finetune of a distilled hybrid." in done.stdout
