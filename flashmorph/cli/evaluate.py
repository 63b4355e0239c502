"""Evaluate a plain or hybrid model: retrieval recall by context length, perplexity, lm-eval tasks.

    python tools/evaluate.py --model exports/embedded --recipe recipes/embedded.yaml --retrieval-lengths 34,66,130 \
        --samples 256 --batch-size 64 --out evals/embedded
    python tools/evaluate.py --model exports/llama3-8b-hybrid --retrieval-lengths 4K,8K,16K,32K,64K,128K \
        --tasks mqar,niah_single,niah_multikey --samples 50 --text-files wiki.test.txt --ppl-window 4096 \
        --lm-eval piqa,arc_easy,arc_challenge,hellaswag,winogrande --dtype bfloat16 --device cuda --out evals/8b

Writes results.json and results.md into --out. Bad input is one `error: ...` line and exit code 2, before any
weight is loaded.
"""

import argparse
import logging
import re
import sys

from flashmorph.cli._tool import ArgumentParser as _Parser  # the tools' shared one-line-error parser
from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.parallel.quiet import quiet_third_party

TASKS = ("mqar", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")  # = flashmorph.data


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(description="Evaluate a HF causal LM (plain or flashmorph hybrid); writes results.json + .md.")
    parser.add_argument("--model", required=True, help="HF model directory (a flashmorph export loads as a hybrid)")
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group("retrieval recall (held-out synthetic sets)")
    group.add_argument("--retrieval-lengths", help="context lengths in tokens, e.g. 512,1024 or 4K,32K,128K "
                                                   "(K = 1024); omit to skip retrieval")
    group.add_argument("--tasks", help=f"comma-separated, any of {', '.join(TASKS)} "
                                       "(default: the recipe's data.tasks, else mqar,niah_single)")
    group.add_argument("--samples", type=int, default=50, help="samples per (task, length)")
    group.add_argument("--batch-size", type=int, default=1, help="samples per forward")
    group.add_argument("--recipe", help="recipe YAML whose data section sets the sample format (task sizes, "
                                        "kv_separator, haystack, seed); the flags below override it")
    group.add_argument("--override", action="append", default=[], metavar="data.FIELD=VALUE",
                       help="override one recipe field (repeatable), e.g. --override data.value_len=2")
    group.add_argument("--num-pairs", type=int, help="mqar pairs / niah_multikey needles (default 8)")
    group.add_argument("--haystack", choices=("vocab", "text"),
                       help="filler: random vocabulary ids (default), or windows of --text-files")
    group.add_argument("--seed", type=int, help="seed of the held-out sets (default 0)")
    group = parser.add_argument_group("perplexity (local corpus)")
    group.add_argument("--text-files", nargs="+", default=[], help="local .txt/.jsonl/.json/.parquet files")
    group.add_argument("--text-field", default="text", help="text column of .jsonl/.json/.parquet files")
    group.add_argument("--ppl-window", type=int, default=1024, help="tokens per window")
    group.add_argument("--ppl-stride", type=int, default=None, help="window start-to-start distance (default: window)")
    group.add_argument("--ppl-batch-size", type=int, default=4, help="windows per forward")
    group.add_argument("--ppl-max-tokens", type=int, default=None, help="score at most this many corpus tokens")
    group = parser.add_argument_group("lm-eval-harness (needs `pip install lm-eval` and the tasks' data)")
    group.add_argument("--lm-eval", help="comma-separated task names, e.g. piqa,arc_easy,hellaswag,winogrande")
    group.add_argument("--lm-eval-limit", type=int, default=None, help="documents per task (default: all)")
    group.add_argument("--lm-eval-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    group.add_argument("--lm-eval-batch-size", type=int, default=8, help="requests per forward")
    group.add_argument("--lm-eval-include-path", default=None, help="folder of extra task YAMLs (local data)")
    return parser.parse_args(argv)


def parse_names(text: str, flag: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"{flag}={text!r} names nothing; give comma-separated names")
    return names


def parse_lengths(text: str) -> list[int]:
    """'512,4K,128k' -> [512, 4096, 131072]."""
    lengths = []
    for item in parse_names(text, "--retrieval-lengths"):
        match = re.fullmatch(r"(\d+)([kK]?)", item)
        if match is None:
            raise ConfigError(f"--retrieval-lengths entry {item!r} is not a length; use e.g. 512 or 4K")
        lengths.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    return lengths


def build_config(args: argparse.Namespace):
    """The EvaluationConfig the arguments describe (checked later, still before any weight is loaded)."""
    from flashmorph.data import DataConfig
    from flashmorph.evaluation import EvaluationConfig, LMEvalConfig, PerplexityConfig, RetrievalEvalConfig

    retrieval = perplexity = lm_eval = None
    if args.retrieval_lengths is not None:
        data = _recipe_data(args) if args.recipe is not None else DataConfig()
        for name in ("num_pairs", "haystack", "seed"):
            if getattr(args, name) is not None:
                setattr(data, name, getattr(args, name))
        if data.haystack == "text" and args.text_files:
            data.text_files, data.text_field = list(args.text_files), args.text_field
        if data.haystack == "text" and not data.text_files:
            raise ConfigError("--haystack text needs --text-files (the corpus the filler comes from)")
        tasks = args.tasks or (",".join(data.tasks) if args.recipe is not None else "mqar,niah_single")
        retrieval = RetrievalEvalConfig(tasks=parse_names(tasks, "--tasks"),
                                        lengths=parse_lengths(args.retrieval_lengths), samples=args.samples,
                                        batch_size=args.batch_size, data=data)
    elif args.recipe is not None or args.override:
        raise ConfigError("--recipe/--override set the retrieval sets; add --retrieval-lengths or drop them")
    if args.text_files:
        perplexity = PerplexityConfig(text_files=list(args.text_files), text_field=args.text_field,
                                      window=args.ppl_window, stride=args.ppl_stride,
                                      batch_size=args.ppl_batch_size, max_tokens=args.ppl_max_tokens)
    if args.lm_eval is not None:
        lm_eval = LMEvalConfig(tasks=parse_names(args.lm_eval, "--lm-eval"), num_fewshot=args.lm_eval_fewshot,
                               limit=args.lm_eval_limit, batch_size=args.lm_eval_batch_size,
                               include_path=args.lm_eval_include_path)
    return EvaluationConfig(model=args.model, out=args.out, retrieval=retrieval, perplexity=perplexity,
                            lm_eval=lm_eval, dtype=args.dtype, device=args.device or _default_device(),
                            show_progress=not args.no_progress)


def _recipe_data(args: argparse.Namespace):
    from flashmorph.config import load_recipe

    for item in args.override:
        if not item.startswith("data."):
            raise ConfigError(f"--override {item!r}: evaluation reads only the data section; use data.FIELD=VALUE")
    return load_recipe(args.recipe, args.override).data


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        # torch-free first, so a bad model directory is refused in a fraction of a second
        from flashmorph.model.hf_dir import check_eval_model_dir

        check_eval_model_dir(args.model, f"--model {args.model}")
        # imported here so that --help and argument errors answer without loading torch
        from flashmorph.evaluation import run_evaluation, to_markdown

        results = run_evaluation(build_config(args))
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
