"""Natural text that ships with every Python install: the source files of the standard library (code, comments and
docstrings; PSF License 2.0), split by module into a train and a held-out eval part, for the proxy teacher.

Only top-level pure-Python modules (`<stdlib>/*.py`) are read, as UTF-8, nothing is imported or downloaded. The split
is a fixed function of the module name, so every machine with the same Python version gets the same two corpora,
byte for byte (another Python version has other sources: the report records the version)."""

import json
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from flashmorph.errors import ConfigError, check_choice
from flashmorph.io.atomic import atomic_write_text

SPLITS = ("train", "eval")
EVAL_BUCKETS = 10  # crc32(name) % 10 == 0 goes to eval: ~10% of the modules, disjoint from train
LICENCE = "Python Software Foundation License 2.0 (the CPython standard library sources)"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_split(name: str) -> str:
    return "eval" if zlib.crc32(name.encode("utf-8")) % EVAL_BUCKETS == 0 else "train"


def stdlib_documents(split: str) -> list[tuple[str, str]]:
    """[(module name, source text)] of `split`, sorted by name; a file that is not UTF-8 is skipped."""
    check_choice("stdlib corpus split", split, SPLITS)
    documents = []
    for path in sorted(stdlib_dir().glob("*.py")):
        name = path.stem
        if name.startswith("_") or module_split(name) != split:
            continue  # private modules are mostly generated tables and test shims, not prose or idiomatic code
        try:
            documents.append((name, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    if not documents:
        raise ConfigError(f"no standard-library sources found under {stdlib_dir()}; the stdlib corpus needs them")
    return documents


def write_stdlib_corpus(path: str | Path, split: str) -> Path:
    """Write `split` as JSON lines {"text", "module"} (flashmorph's text pipeline reads them); kept as is when the
    file already holds the same content, so a datasets cache built on it stays valid."""
    content = "".join(json.dumps({"text": text, "module": name}) + "\n" for name, text in stdlib_documents(split))
    path = Path(path)
    if not (path.is_file() and path.read_text(encoding="utf-8") == content):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, content)
    return path


def byte_stream(split: str, byte_ids: np.ndarray, separator_id: int) -> np.ndarray:
    """The documents of `split` as one int64 token stream: each UTF-8 byte b becomes byte_ids[b], and
    `separator_id` follows every document (the tokenizer-less teacher's view of text; see ByteTokenizer)."""
    pieces = []
    for _name, text in stdlib_documents(split):
        pieces.append(byte_ids[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)])
        pieces.append(np.array([separator_id], dtype=byte_ids.dtype))
    return np.concatenate(pieces).astype(np.int64)


def corpus_info(split: str) -> dict:
    """What a report should say about the text it trained or evaluated on."""
    documents = stdlib_documents(split)
    return {"corpus": "python-stdlib-source", "split": split, "documents": len(documents),
            "bytes": sum(len(text.encode("utf-8")) for _, text in documents),
            "python": ".".join(map(str, sys.version_info[:3])), "licence": LICENCE}
