"""Retrieval recall by task and context length (NIAH/RULER-style) on held-out synthetic sets.

Each (task, length) cell is its own deterministic set drawn from split "eval", never from the training stream.
Two scores per cell: answer-token accuracy (greedy, teacher-forced) and whole-answer exact match per sample."""

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from flashmorph.data import TASK_NAMES, DataConfig, Haystack, RetrievalDataset, TokenSpace
from flashmorph.data.tasks import IGNORE_INDEX
from flashmorph.errors import ConfigError
from flashmorph.evaluation.forward import last_logits

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"  # the stream every training stage draws from; evaluation must never read it


@dataclass
class RetrievalEvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["mqar", "niah_single"])  # each task is scored on its own set
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072])  # tokens/sample
    samples: int = 50  # samples per (task, length) cell
    batch_size: int = 1  # samples per forward; 1 suits 128K contexts, tiny models take many more
    split: str = "eval"  # held-out split name; "train" is refused
    data: DataConfig = field(default_factory=DataConfig)  # task sizes, haystack and seed; tasks/seq_len set per cell

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix; needs neither a model nor a tokenizer."""
        if not self.tasks:
            raise ConfigError(f"retrieval tasks are empty; name any of {TASK_NAMES}")
        for task in self.tasks:
            if task not in TASK_NAMES:
                raise ConfigError(f"retrieval task {task!r} is unknown; use any of {TASK_NAMES}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"retrieval tasks {self.tasks} repeat a task; name each task once")
        if not self.lengths or any(not isinstance(n, int) or n < 2 for n in self.lengths):
            raise ConfigError(f"retrieval lengths {self.lengths} must be integers >= 2, e.g. 4096,8192")
        if len(set(self.lengths)) != len(self.lengths):
            raise ConfigError(f"retrieval lengths {self.lengths} repeat a length; name each length once")
        if self.samples < 1:
            raise ConfigError(f"retrieval samples={self.samples} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"retrieval batch_size={self.batch_size} must be >= 1")
        if self.split == TRAIN_SPLIT:
            raise ConfigError(f"retrieval split={self.split!r} is the training stream; use a held-out split ('eval')")
        shortest = min(self.lengths)
        for task in self.tasks:
            need = self.data.min_seq_len(task)
            if shortest < need:
                raise ConfigError(
                    f"retrieval length {shortest} is too short for task {task} (needs >= {need}); "
                    "raise the length or lower the task size (num_pairs, value_len, num_values, chain_len)"
                )

    def cell_data(self, task: str, length: int) -> DataConfig:
        """The data config of one cell: one task, one length, everything else from `data`."""
        return dataclasses.replace(self.data, tasks={task: 1.0}, seq_len=length)


@torch.no_grad()
def answer_hits(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: answer tokens whose greedy prediction is exact, and answer tokens; both [batch] on the CPU.

    Answers sit in the query section at the end of every sample, so only the logits from the first answer
    position on are computed."""
    answer = labels != IGNORE_INDEX  # [batch, seq]
    positions = answer.any(0).nonzero()
    if positions.numel() == 0:
        zeros = torch.zeros(labels.shape[0], dtype=torch.long)
        return zeros, zeros
    first = max(1, int(positions[0]))  # position 0 (BOS) has nothing before it to predict it from
    seq_len = input_ids.shape[1]
    logits = last_logits(model, input_ids, seq_len - first + 1)  # [batch, seq - first + 1, vocab]
    predicted = logits[:, :-1].argmax(-1).cpu()  # predictions of tokens first .. seq-1
    targets = labels[:, first:]
    scored = targets != IGNORE_INDEX
    hits = ((predicted == targets) & scored).sum(1)
    return hits, scored.sum(1)


def _scores(hits: int, tokens: int, exact: int, samples: int) -> dict:
    return {
        "token_accuracy": hits / tokens if tokens else 0.0,
        "exact_match": exact / samples if samples else 0.0,
        "answer_tokens": tokens,
        "samples": samples,
    }


def _pooled(cells: list[dict], key: str) -> list[dict]:
    """Cells pooled by `key` ("task" or "seq_len"): token accuracy over all answer tokens, exact match over samples."""
    groups: dict = {}
    for cell in cells:
        groups.setdefault(cell[key], []).append(cell)
    return [{key: value, **_pool(group)} for value, group in groups.items()]


def _pool(cells: list[dict]) -> dict:
    return _scores(
        sum(c["answer_hits"] for c in cells),
        sum(c["answer_tokens"] for c in cells),
        sum(c["exact_samples"] for c in cells),
        sum(c["samples"] for c in cells),
    )


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    space: TokenSpace,
    cfg: RetrievalEvalConfig,
    haystack: Haystack | None = None,
    show_progress: bool = True,
) -> dict:
    """Recall of `model` on every (task, length) cell of `cfg`. Returns plain JSON-able data:
    {"cells": [...], "by_task": [...], "by_length": [...], "overall": {...}, "config": {...}}."""
    cfg.validate()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and space.vocab_size > vocab:
        raise ConfigError(
            f"the token space spans {space.vocab_size} ids but the model's vocabulary has {vocab}; "
            "evaluate with the model's own tokenizer (or none, for synthetic ids)"
        )
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions and max(cfg.lengths) > max_positions:
        log.warning("retrieval lengths up to %d exceed max_position_embeddings=%d: scores measure extrapolation",
                    max(cfg.lengths), max_positions)
    was_training = model.training
    model.eval()
    batches_per_cell = -(-cfg.samples // cfg.batch_size)
    bar = tqdm(total=len(cfg.tasks) * len(cfg.lengths) * batches_per_cell, desc="retrieval", disable=not show_progress)
    cells = []
    for length in sorted(cfg.lengths):
        for task in cfg.tasks:
            dataset = RetrievalDataset(cfg.cell_data(task, length), space, haystack, split=cfg.split)
            hits = tokens = exact = 0
            for start in range(0, cfg.samples, cfg.batch_size):
                batch = dataset.batch(range(start, min(start + cfg.batch_size, cfg.samples)))
                sample_hits, sample_tokens = answer_hits(model, batch["input_ids"], batch["labels"])
                hits += int(sample_hits.sum())
                tokens += int(sample_tokens.sum())
                exact += int(((sample_hits == sample_tokens) & (sample_tokens > 0)).sum())
                bar.update(1)
            cell = {"task": task, "seq_len": length, **_scores(hits, tokens, exact, cfg.samples),
                    "answer_hits": hits, "exact_samples": exact}
            cells.append(cell)
            bar.set_postfix(task=task, len=length, acc=f"{cell['token_accuracy']:.3f}")
            log.info("retrieval %s @ %d: token accuracy %.4f, exact match %.4f",
                     task, length, cell["token_accuracy"], cell["exact_match"])
    bar.close()
    model.train(was_training)
    return {
        "cells": cells,
        "by_task": _pooled(cells, "task"),
        "by_length": _pooled(cells, "seq_len"),
        "overall": _pool(cells),
        "config": dataclasses.asdict(cfg),
    }
