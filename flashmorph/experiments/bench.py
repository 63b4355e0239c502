"""What every part of the selection experiment shares: the teacher, the device, the token space, the text corpora,
and one evaluation of a layout (recall by length, perplexity) with a memo of recalls at the training length."""

import dataclasses
import logging
import math
from pathlib import Path

import torch

from flashmorph.data import RetrievalDataset
from flashmorph.data.from_model import data_for_model, has_tokenizer, load_tokenizer
from flashmorph.evaluation.perplexity import PerplexityConfig, load_token_stream, window_nll
from flashmorph.evaluation.retrieval import RetrievalEvalConfig, evaluate_retrieval
from flashmorph.experiments.config import ExperimentConfig
from flashmorph.model.hybrid import apply_hybrid_layout
from flashmorph.model.load import load_causal_lm

log = logging.getLogger(__name__)


def text_corpus(out_dir: Path, split: str) -> Path:
    """The held-out-safe natural text of the experiment as a jsonl file ("train": scoring and training text,
    "eval": perplexity only); the one place to switch corpora."""
    from flashmorph.data.stdlib_corpus import write_stdlib_corpus

    return write_stdlib_corpus(out_dir / "text" / f"stdlib_{split}.jsonl", split)


def layout_key(full_layers) -> str:
    return "-".join(str(i) for i in sorted(full_layers)) or "none"


def modes_of(full_layers, num_layers: int) -> list[str]:
    kept = set(full_layers)
    return ["full" if i in kept else "linear" for i in range(num_layers)]


class Bench:
    def __init__(self, cfg: ExperimentConfig, teacher_dir: Path, num_layers: int, vocab_size: int):
        self.cfg, self.teacher_dir, self.num_layers = cfg, Path(teacher_dir), num_layers
        self.out_dir = Path(cfg.out_dir)
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if use_cuda else "float32")
        self.space, self.haystack = data_for_model(teacher_dir, cfg.data, vocab_size)
        self.recall_memo: dict[str, float] = {}  # layout key -> answer-token recall at the training length
        self._lm = None
        self._ppl_tokens = None

    # ------------------------------------------------------------------------------------------------ data

    def tokenizer(self):
        """The teacher's tokenizer, or bytes onto its synthetic filler ids (tokenizer-less proxy teachers)."""
        if has_tokenizer(self.teacher_dir):
            return load_tokenizer(self.teacher_dir)
        from flashmorph.data.byte_tokenizer import ByteTokenizer

        return ByteTokenizer(self.space)

    def retrieval(self, split: str, seed_offset: int = 0) -> RetrievalDataset:
        data = dataclasses.replace(self.cfg.data, seed=self.cfg.data.seed + seed_offset)
        return RetrievalDataset(data, self.space, haystack=self.haystack, split=split)

    def text_windows(self, split: str, seq_len: int):
        from flashmorph.data.packed_text import PackedTextDataset
        from flashmorph.data.text_config import TextDataConfig

        files = [str(text_corpus(self.out_dir, split))]
        return PackedTextDataset.from_config(TextDataConfig(files=files), self.tokenizer(), seq_len)

    # ------------------------------------------------------------------------------------------------ models

    def teacher(self):
        """The teacher on the device, loaded once; evaluation re-applies a layout to it in place."""
        if self._lm is None:
            self._lm = load_causal_lm(self.teacher_dir, self.dtype).to(self.device)
        return self._lm

    # ------------------------------------------------------------------------------------------------ evaluation

    def lengths(self, all_lengths: bool) -> list[int]:
        base = self.cfg.data.seq_len
        return [base * m for m in self.cfg.evaluation.length_multipliers] if all_lengths else [base]

    def recall(self, lm, lengths: list[int]) -> dict:
        ev = self.cfg.evaluation
        cfg = RetrievalEvalConfig(tasks=list(self.cfg.data.tasks), lengths=lengths, samples=ev.samples,
                                  batch_size=ev.batch_size, data=self.cfg.data)
        result = evaluate_retrieval(lm, self.space, cfg, haystack=self.haystack, show_progress=False)
        return {str(row["seq_len"]): {"recall": row["token_accuracy"], "exact_match": row["exact_match"]}
                for row in result["by_length"]}

    def perplexity(self, lm) -> dict:
        ev = self.cfg.evaluation
        if self._ppl_tokens is None:
            cfg = PerplexityConfig(text_files=[str(text_corpus(self.out_dir, "eval"))], window=ev.ppl_window,
                                   max_tokens=ev.ppl_max_tokens)
            self._ppl_tokens = load_token_stream(cfg, self.tokenizer())
        nll, tokens, _ = window_nll(lm, self._ppl_tokens, ev.ppl_window, ev.ppl_window, ev.batch_size)
        return {"perplexity": math.exp(nll / max(tokens, 1)), "tokens": tokens}

    def evaluate(self, full_layers, lm=None, apply: bool = True) -> dict:
        """Recall at every evaluation length and held-out text perplexity of the teacher with `full_layers` kept
        softmax (or of `lm`, e.g. a distilled student that already carries its layout)."""
        lm = lm if lm is not None else self.teacher()
        if apply:
            apply_hybrid_layout(lm, modes_of(full_layers, self.num_layers), self.cfg.morph)
        out = {"full_layers": sorted(full_layers), "by_length": self.recall(lm, self.lengths(True)),
               **self.perplexity(lm)}
        out["recall"] = out["by_length"][str(self.cfg.data.seq_len)]["recall"]
        if lm is self._lm:
            self.recall_memo.setdefault(layout_key(full_layers), out["recall"])
        return out

    def recall_at_train_length(self, full_layers) -> float:
        """Answer-token recall at data.seq_len of the undistilled hybrid; memoized, the exhaustive reference fills it."""
        key = layout_key(full_layers)
        if key not in self.recall_memo:
            lm = self.teacher()
            apply_hybrid_layout(lm, modes_of(full_layers, self.num_layers), self.cfg.morph)
            self.recall_memo[key] = self.recall(lm, self.lengths(False))[str(self.cfg.data.seq_len)]["recall"]
        return self.recall_memo[key]
