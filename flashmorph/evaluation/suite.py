"""The evaluate stage: check every input, load the model once, run the requested evaluations, write the report."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from flashmorph.errors import ConfigError
from flashmorph.evaluation.lm_eval_adapter import LMEvalConfig, check_tasks, evaluate_lm_eval
from flashmorph.evaluation.loading import (
    check_device,
    check_dtype,
    is_hybrid_export,
    load_eval_model,
    load_eval_tokenizer,
)
from flashmorph.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
from flashmorph.evaluation.report import write_report
from flashmorph.evaluation.retrieval import RetrievalEvalConfig, evaluate_retrieval
from flashmorph.model.hf_dir import check_eval_model_dir

log = logging.getLogger(__name__)


@dataclass
class EvaluationConfig:
    model: str  # HF causal LM directory: plain, or a flashmorph hybrid export (config.json with a flashmorph section)
    out: str | None = None  # directory for results.json + results.md; None = return the results only
    retrieval: RetrievalEvalConfig | None = None  # recall by task and length; None = skip
    perplexity: PerplexityConfig | None = None  # perplexity on local text files; None = skip
    lm_eval: LMEvalConfig | None = None  # lm-eval-harness tasks; None = skip
    dtype: str = "auto"  # auto (as saved), float32, bfloat16 or float16
    device: str = "cpu"  # torch device the model runs on
    show_progress: bool = True  # tqdm bars


@dataclass
class _Prepared:
    """What the checks produced, so that nothing is built twice."""

    model_config: dict
    space: object = None  # TokenSpace for retrieval
    haystack: object = None  # Haystack for retrieval with haystack="text"
    task_manager: object = None  # lm-eval TaskManager that knows the requested tasks


def prepare(cfg: EvaluationConfig) -> _Prepared:
    """Every check that needs no weights: paths, names, lengths, tokenizer, lm-eval and its tasks."""
    if cfg.retrieval is None and cfg.perplexity is None and cfg.lm_eval is None:
        raise ConfigError("nothing to evaluate; ask for retrieval lengths, perplexity text files or lm-eval tasks")
    check_dtype(cfg.dtype)
    check_device(cfg.device)
    if cfg.out is not None and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out {cfg.out} is a file; choose a directory path")
    prepared = _Prepared(model_config=check_eval_model_dir(cfg.model, f"--model {cfg.model}"))
    if cfg.perplexity is not None:
        cfg.perplexity.validate()
        load_eval_tokenizer(cfg.model, "perplexity")  # the tokenizer check, before any weight is read
    if cfg.lm_eval is not None:
        load_eval_tokenizer(cfg.model, "lm-eval")
        prepared.task_manager = check_tasks(cfg.lm_eval)
    if cfg.retrieval is not None:
        cfg.retrieval.validate()
        prepared.space, prepared.haystack = _retrieval_data(cfg, prepared.model_config)
    return prepared


def _retrieval_data(cfg: EvaluationConfig, model_config: dict):
    from flashmorph.data.from_model import data_for_model

    vocab_size = model_config.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise ConfigError(f"--model {cfg.model}: config.json has no integer vocab_size; fix the config")
    retrieval = cfg.retrieval
    space, haystack = data_for_model(cfg.model, retrieval.data, vocab_size)
    for task in retrieval.tasks:  # pools and markers against the real token space
        retrieval.cell_data(task, min(retrieval.lengths)).validate(space=space)
    return space, haystack


def run_evaluation(cfg: EvaluationConfig) -> dict:
    """Evaluate `cfg.model`; returns the results and, if cfg.out is set, writes results.json and results.md."""
    from flashmorph.versions import collect_versions

    prepared = prepare(cfg)
    start = time.perf_counter()
    model = load_eval_model(cfg.model, cfg.dtype, cfg.device)
    needs_tokenizer = cfg.perplexity is not None or cfg.lm_eval is not None
    tokenizer = load_eval_tokenizer(cfg.model) if needs_tokenizer else None
    hybrid = prepared.model_config.get("flashmorph") if is_hybrid_export(prepared.model_config) else None
    seconds = {"load": round(time.perf_counter() - start, 2)}
    results: dict = {"model": str(cfg.model)}
    if cfg.retrieval is not None:
        start = time.perf_counter()
        results["retrieval"] = evaluate_retrieval(model, prepared.space, cfg.retrieval, prepared.haystack,
                                                  cfg.show_progress)
        seconds["retrieval"] = round(time.perf_counter() - start, 2)
    if cfg.perplexity is not None:
        start = time.perf_counter()
        results["perplexity"] = evaluate_perplexity(model, tokenizer, cfg.perplexity, cfg.show_progress)
        seconds["perplexity"] = round(time.perf_counter() - start, 2)
    if cfg.lm_eval is not None:
        start = time.perf_counter()
        results["lm_eval"] = evaluate_lm_eval(model, tokenizer, cfg.lm_eval, prepared.task_manager,
                                              cfg.show_progress)
        seconds["lm_eval"] = round(time.perf_counter() - start, 2)
    results["meta"] = {
        "model_type": prepared.model_config.get("model_type"),
        "hybrid_layer_types": ",".join(hybrid["layer_types"]) if hybrid and "layer_types" in hybrid else None,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "seconds": seconds,
        "versions": collect_versions(),
    }
    if cfg.out is not None:
        json_path, md_path = write_report(results, cfg.out)
        log.info("wrote %s and %s", json_path, md_path)
    return results
