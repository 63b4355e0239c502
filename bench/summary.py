"""Print every benchmark table found in a results directory (the JSON files bench/*.py write), as markdown.

    python -m bench.summary runs/bench_gpu > summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import render

ORDER = ("gate_memory", "hybrid_inference", "branch_cost", "selection_cost", "attention_kernels")  # as run_gpu.sh runs them


def summarize(out_dir: str | Path) -> str:
    """Every results file of out_dir rendered, in run order; unreadable or foreign JSON files are named, not fatal."""
    texts = []
    paths = sorted(Path(out_dir).glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.name))
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            texts.append(render(data))
        except (OSError, ValueError, KeyError, TypeError) as err:
            texts.append(f"## {path.name}\n\nnot a benchmark results file ({type(err).__name__}: {err})")
    return "\n\n".join(texts) if texts else f"no results in {out_dir}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m bench.summary RESULTS_DIR")
    print(summarize(argv[0]))


if __name__ == "__main__":
    main()
