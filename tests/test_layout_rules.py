"""Rules of the tree that a grep can check: no code of ours edits sys.path (scripts run as modules from the checkout,
tests get it from pytest's `pythonpath`, launchers and tools import the installed flashmorph), and run-directory file
names are joined in flashmorph/run_dir.py only (everything else asks RunDir)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("flashmorph", "bench", "launcher", "tools")
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\s*\(|\[[^\]]*\]\s*=(?!=)|\s*[+]?=(?!=))")


def matching_lines(root: Path, pattern: re.Pattern, exempt: tuple[str, ...] = ()) -> list[str]:
    """`path:line: text` of every line under CODE_DIRS (files in `exempt` aside) that `pattern` finds."""
    found = []
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if path.relative_to(root).as_posix() in exempt:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def sys_path_edits(root: Path) -> list[str]:
    return matching_lines(root, SYS_PATH_EDIT)


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


# a path joined from a run-directory name (`run_dir / "summary.json"`) outside flashmorph/run_dir.py, which owns them
RUN_DIR_JOIN = re.compile(r'/\s*"(config\.yaml|versions\.json|log\.txt|run\.lock|checkpoints|tb|summary\.json|'
                          r'gates\.safetensors|hybrid\.json|teacher|teacher_report\.json|adapter|student)"')


def run_dir_name_joins(root: Path) -> list[str]:
    return matching_lines(root, RUN_DIR_JOIN, exempt=("flashmorph/run_dir.py",))


def test_run_dir_file_names_come_from_run_dir():
    assert run_dir_name_joins(ROOT) == [], "ask flashmorph.run_dir.RunDir(path) for the path (.summary, .tb, ...)"


def test_the_run_dir_name_scan_finds_a_join(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "x.py").write_text('a = run_dir / "summary.json"\nb = RunDir(run_dir).summary\n'
                                            'c = Path(d) /"tb"\n')
    assert run_dir_name_joins(tmp_path) == ['tools/x.py:1: a = run_dir / "summary.json"',
                                            'tools/x.py:3: c = Path(d) /"tb"']


def test_comments_cite_documents_that_are_in_the_repository():
    """A comment's "(DESIGN: ...)" pointed at a design note kept outside the repository; cite docs/ instead."""
    assert matching_lines(ROOT, re.compile(r"\bDESIGN\b")) == []
    cited = {m.group(0) for line in matching_lines(ROOT, re.compile(r"docs/[\w/.-]+\.md"))
             for m in re.finditer(r"docs/[\w/.-]+\.md", line)}
    assert cited and all((ROOT / doc).is_file() for doc in cited), sorted(d for d in cited if not (ROOT / d).is_file())
