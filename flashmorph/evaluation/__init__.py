"""Evaluation of plain, morphed or hybrid causal LMs: retrieval recall by length, perplexity, lm-eval tasks."""

from flashmorph.evaluation.lm_eval_adapter import LMEvalConfig, evaluate_lm_eval, make_lm
from flashmorph.evaluation.loading import load_eval_model, load_eval_tokenizer
from flashmorph.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
from flashmorph.evaluation.report import read_report, to_markdown, write_report
from flashmorph.evaluation.retrieval import RetrievalEvalConfig, answer_hits, evaluate_retrieval
from flashmorph.evaluation.suite import EvaluationConfig, run_evaluation

__all__ = [
    "EvaluationConfig",
    "LMEvalConfig",
    "PerplexityConfig",
    "RetrievalEvalConfig",
    "answer_hits",
    "evaluate_lm_eval",
    "evaluate_perplexity",
    "evaluate_retrieval",
    "load_eval_model",
    "load_eval_tokenizer",
    "make_lm",
    "read_report",
    "run_evaluation",
    "to_markdown",
    "write_report",
]
