"""Rules of the tree that a grep can check: no code of ours edits sys.path (scripts run as modules from the checkout,
tests get it from pytest's `pythonpath`, launchers and tools import the installed flashmorph)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("flashmorph", "bench", "launcher", "tools")
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\s*\(|\[[^\]]*\]\s*=(?!=)|\s*[+]?=(?!=))")


def sys_path_edits(root: Path) -> list[str]:
    """`path:line: text` of every line under CODE_DIRS that edits sys.path."""
    found = []
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if SYS_PATH_EDIT.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_code_of_ours_edits_sys_path():
    assert sys_path_edits(ROOT) == [], "run scripts as modules (python -m bench.x) instead of editing sys.path"


def test_the_sys_path_scan_finds_every_kind_of_edit(tmp_path):
    (tmp_path / "bench").mkdir()
    edits = ["sys.path.insert(0, str(ROOT))", "sys.path.append('x')", "sys.path[0] = str(ROOT)", "sys.path += ['x']",
             "sys.path = ['x']", "sys.path.extend(['x'])"]
    fine = ["print(sys.path)", "paths = list(sys.path)", "if str(ROOT) not in sys.path:", "sys.path_hooks",
            "assert sys.path == old"]
    (tmp_path / "bench" / "x.py").write_text("\n".join(edits + fine) + "\n")
    assert [line.split(": ", 1)[1] for line in sys_path_edits(tmp_path)] == edits
