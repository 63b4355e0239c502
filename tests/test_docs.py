"""Every command in README.md and docs/*.md runs as written, or says what it needs.

Each fenced block of commands carries a marker on the line before it (an HTML comment, invisible when rendered):

    <!-- cpu-test -->              run here, in a scratch copy of the repository, on CPU
    <!-- cpu-test: ARGS -->        the same, with ARGS appended to each `python ...` command (small step counts)
    <!-- cpu-slow[: ARGS] -->      runs on CPU but takes minutes: only with FLASHMORPH_SLOW_DOCS=1
    <!-- needs: gpu, model -->     not run here: needs any of gpu, cluster, model (a real model or run on disk),
                                   network (a package index or git remote)
    <!-- ci -->                    the test command .ci/run itself runs (in its fresh venv): checked to be there

Blocks fenced as ```text (example output) or ```python / ```yaml / ```json (snippets) are not commands. Install steps
(`[VAR=x] pip install ...`) are what .ci/run does in its fresh venv before the tests: a test skips them and runs the
rest of the line. Commands run in document order; one that uses runs/embedded first gets the README's main job.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_COMMANDS = {"text", "python", "yaml", "json", "toml"}  # fence info strings of blocks that are not commands
NEEDS = {"gpu", "cluster", "model", "network"}
SLOW = os.environ.get("FLASHMORPH_SLOW_DOCS") == "1"
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*(cpu-test|cpu-slow|needs|ci)\s*(?::\s*(.*?))?\s*-->$")
_INSTALL = re.compile(r"^(\w+=\S*\s+)*pip\s+install\b")


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    info: str  # the fence's info string ("" for a plain fence)
    marker: str | None  # cpu-test, cpu-slow, needs, ci, or None
    argument: str  # what follows the marker's colon
    text: str  # the block's content

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def parse_blocks(doc: Path, text: str | None = None) -> list[Block]:
    lines = (doc.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(before)
        blocks.append(Block(doc, i + 1, fence.group(1), marker and marker.group(1), (marker and marker.group(2)) or "",
                            "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def _split_outside_quotes(line: str) -> list[str]:
    """The `&&`-separated commands of a shell line, its trailing `# comment` removed; quotes are respected."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (not current or current[-1].isspace()):
            break
        elif line.startswith("&&", i):
            parts.append(current)
            current, i = "", i + 2
            continue
        current += char
        i += 1
    return [p.strip() for p in parts + [current] if p.strip()]


def commands_of(block: Block) -> list[str]:
    """The block as shell lines to run: continuations joined, comments and install steps dropped, the marker's
    arguments appended to each `python ...` command."""
    joined = re.sub(r"\s*\\\n\s*", " ", block.text)
    out = []
    for line in joined.splitlines():
        kept = []
        for command in _split_outside_quotes(line):
            if _INSTALL.match(command):
                continue
            if block.argument and command.startswith("python "):
                command = f"{command} {block.argument}"
            kept.append(command)
        if kept:
            out.append(" && ".join(kept))
    return out


def all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in parse_blocks(doc)]


def runnable(marker: str) -> list[Block]:
    return [b for b in all_blocks() if b.marker == marker]


# ----------------------------------------------------------------------------------------------- markers


def test_every_command_block_is_marked():
    """A new command cannot slip into README/docs without saying whether it runs on CPU, and CI then runs it."""
    unmarked = [b.where for b in all_blocks() if b.info not in NOT_COMMANDS and b.marker is None]
    assert not unmarked, ("fenced blocks without a marker (see tests/test_docs.py; example output is ```text): "
                          + ", ".join(unmarked))
    for block in all_blocks():
        if block.marker == "needs":
            needs = {n.strip() for n in block.argument.split(",")}
            assert needs and needs <= NEEDS, f"{block.where}: needs {block.argument!r}; use some of {sorted(NEEDS)}"
        if block.marker in ("cpu-test", "cpu-slow"):
            assert commands_of(block), f"{block.where}: a {block.marker} block with nothing to run"


def test_the_marker_parser(tmp_path):
    doc = tmp_path / "x.md"
    text = """intro

<!-- cpu-test: --override search.steps=2 -->
```
DS_BUILD_OPS=0 pip install -e . && python launcher/a.py --config r.yaml   # a comment
python tools/b.py --x 1 \\
    --y "a # not a comment && not a split"
bash scripts/c.sh
```

```text
output
```
```
ls
```
"""
    first, output, plain = parse_blocks(doc, text)
    assert (first.marker, first.argument, first.line) == ("cpu-test", "--override search.steps=2", 4)
    assert commands_of(first) == [
        "python launcher/a.py --config r.yaml --override search.steps=2",
        'python tools/b.py --x 1 --y "a # not a comment && not a split" --override search.steps=2',
        "bash scripts/c.sh",
    ]
    assert (output.info, output.marker) == ("text", None) and plain.marker is None


def test_the_readme_test_command_is_what_ci_runs():
    ci_script = (ROOT / ".ci" / "run").read_text()
    for block in runnable("ci"):
        for line in block.text.splitlines():
            assert line.strip() in ci_script, f"{block.where}: .ci/run does not run {line.strip()!r}"


# ----------------------------------------------------------------------------------------------- running


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A scratch copy of the repository (no runs/, no .git), so commands write nowhere in the checkout."""
    dest = tmp_path_factory.mktemp("docs") / "flashmorph"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "runs", "__pycache__", "*.egg-info", "build", "dist", "wheelhouse", ".pytest_cache", ".bench_cache"))
    return dest


def run_block(block: Block, workspace: Path, timeout: float = 900) -> None:
    # one intra-op thread: tiny models gain nothing from more, and on a shared box two spin (docs/status.md)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join(p for p in [str(workspace), os.environ.get("PYTHONPATH", "")] if p))
    if "runs/embedded" in block.text and not (workspace / "runs" / "embedded" / "gates.safetensors").exists():
        main_job = runnable("cpu-test")[0]
        assert main_job.doc.name == "README.md" and "recipes/embedded.yaml" in main_job.text
        if main_job is not block:
            run_block(main_job, workspace, timeout)
    script = "set -euo pipefail\n" + "\n".join(commands_of(block)) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = (proc.stdout + "\n" + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{block.where} exited {proc.returncode}:\n{script}\n{output}"


@pytest.mark.parametrize("block", runnable("cpu-test"), ids=lambda b: b.where)
def test_cpu_command_runs(block, workspace):
    run_block(block, workspace)


@pytest.mark.skipif(not SLOW, reason="minutes on 2 cores: FLASHMORPH_SLOW_DOCS=1 runs them")
@pytest.mark.parametrize("block", runnable("cpu-slow"), ids=lambda b: b.where)
def test_slow_cpu_command_runs(block, workspace):
    run_block(block, workspace, timeout=3600)
