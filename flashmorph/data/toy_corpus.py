"""A toy text corpus generated offline: the docstrings of a fixed list of Python stdlib modules (~30 documents,
~180 KB of English-like text), for the embedded CPU pipeline. Not training data for a real model.

Read from the stdlib sources with `ast` (nothing is imported, nothing is downloaded); the same Python version gives
the same file, byte for byte."""

import ast
import json
import sysconfig
from pathlib import Path

from flashmorph.errors import ConfigError
from flashmorph.io.atomic import atomic_write_text

# pure-Python modules with rich docstrings, small enough that parsing all of them takes ~0.2 s
TOY_MODULES = (
    "abc bisect calendar cmd colorsys contextlib copy csv difflib fileinput fnmatch fractions getopt glob heapq hmac "
    "ipaddress operator pprint queue random shlex shutil statistics string textwrap timeit traceback uuid warnings "
    "weakref"
).split()


def module_docstrings(name: str, stdlib: Path) -> str:
    """One document: the module's docstring, then those of its classes and functions in source order."""
    tree = ast.parse((stdlib / f"{name}.py").read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return "\n\n".join(doc for doc in map(ast.get_docstring, nodes) if doc)


def write_toy_corpus(path: str | Path) -> Path:
    """Write the toy corpus as JSON lines {"text", "module"} to `path` (kept as is when already identical, so the
    datasets cache of an earlier run stays valid) and return the path."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for name in TOY_MODULES:
        if (stdlib / f"{name}.py").is_file():  # a trimmed Python install may lack a module: the corpus just shrinks
            lines.append(json.dumps({"text": module_docstrings(name, stdlib), "module": name}) + "\n")
    if not lines:
        raise ConfigError(f"text.toy_corpus: no stdlib sources under {stdlib}; give text.files instead")
    content, path = "".join(lines), Path(path)
    if not (path.is_file() and path.read_text(encoding="utf-8") == content):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, content)
    return path
