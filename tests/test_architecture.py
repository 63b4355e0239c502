"""The import direction of docs/architecture.md: a flashmorph module imports only from its own layer or a lower one
(module-level and function-level imports alike), and no two packages import each other, directly or around a loop."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module belongs to the layer of its longest matching prefix (docs/architecture.md draws the same)
LAYERS = (
    ("errors", ("flashmorph.errors",)),
    ("io", ("flashmorph.io", "flashmorph.versions", "flashmorph.telemetry")),
    ("model", ("flashmorph.model",)),
    ("data", ("flashmorph.data",)),
    ("parallel", ("flashmorph.parallel",)),
    ("checkpoint", ("flashmorph.checkpoint",)),
    ("run_dir", ("flashmorph.run_dir",)),
    ("config", ("flashmorph.config", "flashmorph.estimate")),
    ("training", ("flashmorph.training",)),
    ("products", ("flashmorph.selection", "flashmorph.evaluation", "flashmorph.export")),
    ("stages", ("flashmorph.stages",)),
    ("experiments", ("flashmorph.experiments",)),
    ("entry", ("flashmorph.cli", "flashmorph")),
)
# `import flashmorph` / `from flashmorph import __version__`: the package root holds the version, which every layer
# may read; its lazy `load_hybrid` is an import of the entry layer, checked like any other
ROOT_PACKAGE = "flashmorph"


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, package_dir: Path) -> bool:
    path = package_dir.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    """(line, module) of every flashmorph import in `path`, at any depth (functions, classes, if-blocks)."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from .. import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub, package_dir) else base))
    return sorted({(line, mod) for line, mod in found if mod == ROOT_PACKAGE or mod.startswith(ROOT_PACKAGE + ".")})


def layer_of(module: str) -> int | None:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def upward_imports(package_dir: Path) -> list[str]:
    """`file:line: module (layer A) imports target (layer B)` for every import of a higher layer."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        source = module_name(path, package_dir)
        for line, target in imported_modules(path, package_dir):
            if target == ROOT_PACKAGE:
                continue
            src, dst = layer_of(source), layer_of(target)
            if dst > src:
                found.append(f"{path.relative_to(package_dir.parent)}:{line}: {source} (layer {LAYERS[src][0]}) "
                             f"imports {target} (layer {LAYERS[dst][0]})")
    return found


def package_graph(package_dir: Path) -> dict[str, set[str]]:
    """flashmorph.<top> -> the other flashmorph.<top> it imports (a package or a top-level module)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        source = ".".join(module_name(path, package_dir).split(".")[:2])
        for _, target in imported_modules(path, package_dir):
            target = ".".join(target.split(".")[:2])
            if target not in (source, ROOT_PACKAGE) and source != ROOT_PACKAGE:
                graph.setdefault(source, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_every_module_has_a_layer():
    package_dir = ROOT / "flashmorph"
    unplaced = [str(p.relative_to(ROOT)) for p in sorted(package_dir.rglob("*.py"))
                if layer_of(module_name(p, package_dir)) is None]
    assert unplaced == [], "add the new package to LAYERS here and to the picture in docs/architecture.md"


def test_no_import_points_upward():
    assert upward_imports(ROOT / "flashmorph") == [], (
        "move the imported code down to the layer that owns it (see docs/architecture.md), or the importer up")


def test_no_package_level_import_cycle():
    assert find_cycle(package_graph(ROOT / "flashmorph")) == []


def test_the_layers_are_the_ones_docs_architecture_draws():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    picture = doc.split("```text\n", 1)[1].split("```", 1)[0]  # the first diagram: one layer a line, highest first
    drawn = [line.split()[0] for line in picture.splitlines() if line.strip()]
    assert drawn == [name for name, _ in reversed(LAYERS)], "docs/architecture.md and LAYERS must list the same layers"


def _fake_package(tmp_path: Path) -> Path:
    package_dir = tmp_path / "flashmorph"
    for rel, text in {
        "__init__.py": "",
        "errors.py": "",
        "model/__init__.py": "",
        "model/morph.py": "import flashmorph\nfrom flashmorph.errors import X\n",
        "model/load.py": "def f():\n    from flashmorph.config import DTYPES\n",  # function level
        "model/rel.py": "from ..stages import teacher\n",  # relative, `from pkg import submodule`
        "config.py": "from flashmorph.model import morph\n",
        "stages/__init__.py": "",
        "stages/teacher.py": "import flashmorph.model.load\n",
    }.items():
        (package_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / rel).write_text(text)
    return package_dir


def test_the_scan_finds_function_level_and_relative_imports(tmp_path):
    found = upward_imports(_fake_package(tmp_path))
    assert found == [
        "flashmorph/model/load.py:2: flashmorph.model.load (layer model) imports flashmorph.config (layer config)",
        "flashmorph/model/rel.py:1: flashmorph.model.rel (layer model) imports flashmorph.stages.teacher "
        "(layer stages)",
    ]


def test_the_cycle_check_finds_a_package_loop(tmp_path):
    graph = package_graph(_fake_package(tmp_path))
    assert graph["flashmorph.model"] == {"flashmorph.config", "flashmorph.errors", "flashmorph.stages"}
    assert find_cycle(graph) == ["flashmorph.config", "flashmorph.model", "flashmorph.config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) == []
