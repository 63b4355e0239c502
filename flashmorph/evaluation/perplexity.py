"""Perplexity on a local text corpus: sliding windows over one token stream, token-weighted mean NLL.

A window scores only the tokens no earlier window scored, so each token counts at most once; with stride < window
every token after the first counts, with disjoint windows (stride = window) each window's first token does not."""

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flashmorph.data.config import TEXT_BUILDERS, check_text_contents
from flashmorph.errors import ConfigError
from flashmorph.evaluation.forward import last_logits

log = logging.getLogger(__name__)


@dataclass
class PerplexityConfig:
    text_files: list[str] = field(default_factory=list)  # local .txt/.jsonl/.json/.parquet files, one format
    text_field: str = "text"  # column holding the text in .jsonl/.json/.parquet (a .txt file is one document)
    window: int = 1024  # tokens per forward
    stride: int | None = None  # start-to-start distance of windows; None = window (disjoint windows)
    batch_size: int = 4  # windows per forward
    max_tokens: int | None = None  # score at most this many corpus tokens (None = the whole corpus)

    @property
    def step(self) -> int:
        return self.window if self.stride is None else self.stride

    def validate(self) -> str:
        """Raise ConfigError naming the field and the fix; returns the `datasets` builder of the files."""
        if self.window < 2:
            raise ConfigError(f"perplexity window={self.window} must be >= 2 tokens")
        if not 1 <= self.step <= self.window:
            raise ConfigError(f"perplexity stride={self.stride} must lie in [1, window={self.window}]")
        if self.batch_size < 1:
            raise ConfigError(f"perplexity batch_size={self.batch_size} must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"perplexity max_tokens={self.max_tokens} must be >= 2 (or unset for the whole corpus)")
        if not self.text_files:
            raise ConfigError("perplexity needs text files; pass local .txt/.jsonl/.json/.parquet files")
        builders = set()
        for path in self.text_files:
            suffix = Path(path).suffix.lower()
            if suffix not in TEXT_BUILDERS:
                raise ConfigError(f"text file {path!r} has an unsupported suffix; use one of {tuple(TEXT_BUILDERS)}")
            if not Path(path).is_file():
                raise ConfigError(f"text file {path!r} does not exist; fix the path")
            builders.add(TEXT_BUILDERS[suffix])
        if len(builders) > 1:
            raise ConfigError(f"text files mix formats {sorted(builders)}; use files of one format")
        check_text_contents(self.text_files, "--text-files")
        return builders.pop()


def load_token_stream(cfg: PerplexityConfig, tokenizer) -> torch.Tensor:
    """The corpus as one [num_tokens] stream: BOS (if the tokenizer has one), then every document's tokens,
    documents separated by EOS (if it has one). Loaded with `datasets` from local files only."""
    import datasets

    builder = cfg.validate()
    options = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
    rows = datasets.load_dataset(builder, data_files=[str(f) for f in cfg.text_files], split="train", **options)
    text_field = "text" if builder == "text" else cfg.text_field  # the text builder has exactly this column
    if text_field not in rows.column_names:
        raise ConfigError(f"text field {text_field!r} is not a column of the text files; columns: {rows.column_names}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    limit = cfg.max_tokens or math.inf
    pieces, total = [np.asarray(bos, dtype=np.int64)], len(bos)  # int64 arrays, not lists: corpora can be large
    for batch in rows.iter(batch_size=256):
        texts = [t for t in batch[text_field] if t]
        if not texts:
            continue
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            piece = np.asarray((separator if len(pieces) > 1 else []) + ids, dtype=np.int64)
            pieces.append(piece)
            total += piece.size
        if total >= limit:
            break
    if total == len(bos):
        raise ConfigError(f"text files {cfg.text_files} hold no text in field {text_field!r}; give non-empty files")
    stream = np.concatenate(pieces)
    return torch.from_numpy(stream[: int(min(limit, stream.size))])


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; scored ranges never overlap and, for stride < window,
    tile [1, num_tokens) exactly."""
    windows, scored_until = [], 1
    for begin in range(0, max(num_tokens - 1, 1), stride):
        end = min(begin + window, num_tokens)
        if end > scored_until:
            windows.append((begin, end, max(scored_until, begin + 1)))
            scored_until = end
        if end == num_tokens:
            break
    return windows


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """fp32 cross entropy per position, upcasting `chunk` positions at a time: [batch, seq, vocab] -> [batch, seq]."""
    return torch.cat([
        F.cross_entropy(logits[:, i : i + chunk].float().transpose(1, 2), targets[:, i : i + chunk], reduction="none")
        for i in range(0, targets.shape[1], chunk)
    ], dim=1)


@torch.no_grad()
def window_nll(model: nn.Module, tokens: torch.Tensor, window: int, stride: int, batch_size: int = 4,
               show_progress: bool = False) -> tuple[float, int, int]:
    """(summed NLL in nats, scored tokens, windows) of `tokens` [num_tokens] under `model`."""
    spans = sliding_windows(tokens.numel(), window, stride)
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:  # equal-length windows share a batch; only the last window can be shorter
        by_length.setdefault(span[1] - span[0], []).append(span)
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=len(spans), desc="perplexity", disable=not show_progress)
    for length, group in by_length.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            input_ids = torch.stack([tokens[b:e] for b, e, _ in chunk])  # [batch, length]
            first = min(s - b for b, _, s in chunk)  # earliest scored position, relative to the window
            logits = last_logits(model, input_ids, length - first + 1)[:, :-1]  # predicts positions first..length-1
            nll = _token_nll(logits, input_ids[:, first:].to(logits.device))  # [batch, length - first]
            relative = torch.arange(first, length, device=logits.device)
            scored = relative[None, :] >= torch.tensor([s - b for b, _, s in chunk], device=logits.device)[:, None]
            total_nll += float(nll[scored].double().sum())
            total_tokens += int(scored.sum())
            bar.update(len(chunk))
    bar.close()
    return total_nll, total_tokens, len(spans)


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, tokenizer, cfg: PerplexityConfig, show_progress: bool = True) -> dict:
    """exp(token-weighted mean NLL) of the corpus, with the numbers it came from (plain JSON-able data)."""
    tokens = load_token_stream(cfg, tokenizer)
    was_training = model.training
    model.eval()
    nll, scored, windows = window_nll(model, tokens, cfg.window, cfg.step, cfg.batch_size, show_progress)
    model.train(was_training)
    mean_nll = nll / max(scored, 1)
    log.info("perplexity %.4f (mean NLL %.4f over %d tokens, %d windows)", math.exp(mean_nll), mean_nll, scored,
             windows)
    return {
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "scored_tokens": scored,
        "corpus_tokens": int(tokens.numel()),
        "windows": windows,
        "config": dataclasses.asdict(cfg),
    }
