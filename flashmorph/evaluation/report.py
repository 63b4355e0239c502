"""Evaluation results as results.json (the record) and results.md (tables for humans), each written atomically."""

import json
from pathlib import Path

from flashmorph.errors import FlashMorphError
from flashmorph.io.atomic import atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def write_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write results.json and results.md into `out_dir` (created if needed); returns both paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FlashMorphError(f"--out {out_dir} is a file; choose a directory path")
    text = json.dumps(results, indent=2, sort_keys=False, allow_nan=True) + "\n"
    json_path = atomic_write_text(out_dir / RESULTS_JSON, text)
    md_path = atomic_write_text(out_dir / RESULTS_MD, to_markdown(results))
    return json_path, md_path


def read_report(out_dir: str | Path) -> dict:
    path = Path(out_dir) / RESULTS_JSON
    if not path.is_file():
        raise FlashMorphError(f"{path} does not exist; run tools/evaluate.py with --out {out_dir} first")
    return json.loads(path.read_text(encoding="utf-8"))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def retrieval_table(retrieval: dict) -> list[str]:
    """Rows = tasks (+ all), columns = lengths (+ all); cells = "token accuracy % / exact match %"."""
    lengths = [row["seq_len"] for row in retrieval["by_length"]]
    cell = {(c["task"], c["seq_len"]): c for c in retrieval["cells"]}
    by_task = {row["task"]: row for row in retrieval["by_task"]}
    by_length = {row["seq_len"]: row for row in retrieval["by_length"]}

    def pair(scores: dict) -> str:
        return f"{_percent(scores['token_accuracy'])} / {_percent(scores['exact_match'])}"

    rows = [[task] + [pair(cell[task, n]) for n in lengths] + [pair(by_task[task])] for task in by_task]
    rows.append(["all"] + [pair(by_length[n]) for n in lengths] + [pair(retrieval["overall"])])
    return _table(["task"] + [str(n) for n in lengths] + ["all"], rows)


def perplexity_table(perplexity: dict) -> list[str]:
    cfg = perplexity["config"]
    row = [f"{perplexity['perplexity']:.4f}", f"{perplexity['mean_nll']:.4f}", str(perplexity["scored_tokens"]),
           str(cfg["window"]), str(cfg["stride"] or cfg["window"]), ", ".join(cfg["text_files"])]
    return _table(["perplexity", "mean NLL", "scored tokens", "window", "stride", "files"], [row])


def lm_eval_table(lm_eval: dict) -> list[str]:
    """One row per (task, metric), its "<metric>_stderr" beside it."""
    rows = []
    for task, metrics in lm_eval["tasks"].items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                stderr = metrics.get(f"{metric}_stderr")
                rows.append([task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}"])
    return _table(["task", "metric", "value", "stderr"], rows)


def to_markdown(results: dict) -> str:
    lines = [f"# flashmorph evaluation: {results.get('model', '?')}", ""]
    if "retrieval" in results:
        lines += ["## Retrieval recall", "",
                  "answer-token accuracy % / whole-answer exact match %, by task and context length (tokens)", ""]
        lines += retrieval_table(results["retrieval"]) + [""]
    if "perplexity" in results:
        lines += ["## Perplexity", ""] + perplexity_table(results["perplexity"]) + [""]
    if "lm_eval" in results:
        lines += ["## lm-eval", ""] + lm_eval_table(results["lm_eval"]) + [""]
    meta = results.get("meta", {})
    if meta:
        lines += ["## Run", ""] + [f"- {key}: {value}" for key, value in meta.items() if key != "versions"] + [""]
    return "\n".join(lines)
