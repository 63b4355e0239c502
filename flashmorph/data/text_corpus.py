"""Local corpus files -> one token stream (each document's ids, then EOS), tokenized once and cached by `datasets`.

Files are read with `datasets.load_dataset(builder, data_files=...)` (local paths only, nothing is fetched) and
tokenized with `Dataset.map`, whose result is cached next to the parsed corpus (in text.cache_dir) under a
fingerprint of the files, the tokenizer and the settings: a second run reads the cache instead of tokenizing again.
Under several ranks, tokenize on the main rank first (parallel.distributed.run_on_main) so that the others read the
cache rather than race to write it. Memory: the stream is held as int32 (4 bytes/token: 100M tokens = 400 MB)."""

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from flashmorph.data.text_config import TextDataConfig
from flashmorph.errors import ConfigError

log = logging.getLogger(__name__)

_MAP_BATCH = 1000  # documents per tokenizer call: amortizes the Rust call without holding many strings at once


@dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # [num_tokens] int32: every document's ids followed by eos_id, in file order
    num_documents: int  # non-empty documents in the stream
    eos_id: int  # the separator written after every document


def separator_id(tokenizer) -> int:
    """EOS, falling back to BOS (one id that marks a document boundary, as GPT-2's <|endoftext|> does)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("tokenizer has neither eos_token nor bos_token; set tokenizer.eos_token before packing text")


class _TokenizeBatch:
    """The map function: a picklable object (not a closure) so that datasets fingerprints it deterministically."""

    def __init__(self, tokenizer, text_field: str, eos_id: int):
        self.tokenizer, self.text_field, self.eos_id = tokenizer, text_field, eos_id

    def __call__(self, batch: dict) -> dict:
        texts = [t for t in batch[self.text_field] if t]  # empty / null documents vanish instead of adding a bare EOS
        if not texts:
            return {"input_ids": []}
        # verbose=False: a long document beyond the tokenizer's model_max_length is fine here (it gets packed)
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [ids + [self.eos_id] for ids in encoded]}


def load_documents(cfg: TextDataConfig, files: list[str] | None = None):
    """The corpus as a `datasets.Dataset` with one document per row in column "text" or cfg.text_field."""
    import datasets

    files = [str(f) for f in (cfg.files if files is None else files)]
    builder = dataclasses.replace(cfg, files=files).builder()
    options = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cfg.cache_dir, **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"text.files could not be read as {builder} files ({reason}); check text.format") from exc
    text_field = "text" if builder == "text" else cfg.text_field  # the text builder has exactly this column
    if text_field not in rows.column_names:
        raise ConfigError(f"text.text_field={text_field!r} is not a column of text.files; columns: {rows.column_names}")
    dtype = getattr(rows.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ConfigError(
            f"text.text_field={text_field!r} holds {rows.features[text_field]}, not strings; pick a text column"
        )
    if cfg.max_documents is not None and cfg.max_documents < len(rows):
        rows = rows.select(range(cfg.max_documents))
    return rows.select_columns([text_field])


def tokenize_corpus(cfg: TextDataConfig, tokenizer, files: list[str] | None = None) -> TokenStream:
    """Load `files` (default cfg.files), tokenize every document without special tokens, append the separator id,
    and concatenate in file order. The tokenized rows are cached by datasets; shows datasets' progress bar."""
    import datasets

    rows = load_documents(cfg, files)
    text_field = rows.column_names[0]
    eos_id = separator_id(tokenizer)
    tokenized = rows.map(
        _TokenizeBatch(tokenizer, text_field, eos_id),
        batched=True,
        batch_size=_MAP_BATCH,
        remove_columns=[text_field],
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        desc=f"tokenizing {len(rows)} documents",
    )
    column = tokenized.with_format("arrow")["input_ids"]  # pyarrow ChunkedArray of list<int32>, memory-mapped
    pieces = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    tokens = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else np.empty(0, dtype=np.int32)
    log.info("text corpus: %d documents, %d tokens (EOS included)", len(tokenized), tokens.size)
    return TokenStream(tokens=tokens, num_documents=len(tokenized), eos_id=eos_id)
