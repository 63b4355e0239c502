"""Filler tokens between the needles: i.i.d. vocabulary ids, or windows of a local text corpus tokenized once.

Memory: a text haystack holds the whole corpus as one int32 token stream (4 bytes/token: 100M tokens = 400 MB);
DataLoader workers forked after it is built share those pages copy-on-write."""

from collections.abc import Iterable, Sequence

import numpy as np

from flashmorph.data.config import DataConfig, text_builder
from flashmorph.data.token_space import TokenSpace, bos_pad_ids, find_markers
from flashmorph.errors import ConfigError

_TOKENIZE_BATCH = 1000  # rows per tokenizer call: amortizes the Rust call without holding many strings at once


class Haystack:
    """`sample(rng, n)` returns n filler ids. kind="vocab": `tokens` is a pool drawn from i.i.d.;
    kind="text": `tokens` is a token stream and a sample is a window of it at a random offset (wrapping around)."""

    def __init__(self, tokens: np.ndarray, kind: str):
        if kind not in ("vocab", "text"):
            raise ConfigError(f"data.haystack={kind!r} is unknown; use 'vocab' or 'text'")
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size == 0:
            raise ConfigError(
                f"data.haystack={kind}: the haystack has no tokens; give a non-empty corpus or vocabulary"
            )
        self.tokens = tokens
        self.kind = kind

    def __len__(self) -> int:
        return int(self.tokens.size)

    def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """[length] int64 filler ids, fixed by the state of `rng`."""
        if length <= 0:
            return np.empty(0, dtype=np.int64)
        if self.kind == "vocab":
            return self.tokens[rng.integers(0, self.tokens.size, size=length)].astype(np.int64, copy=False)
        start = int(rng.integers(0, self.tokens.size))
        if start + length <= self.tokens.size:
            return self.tokens[start : start + length].astype(np.int64)
        # a window past the end wraps around, so corpora shorter than seq_len still work (they repeat)
        return self.tokens[(start + np.arange(length)) % self.tokens.size].astype(np.int64)

    @classmethod
    def from_vocab(cls, space: TokenSpace) -> "Haystack":
        """I.i.d. draws from `space.filler_ids` (disjoint from keys, values and markers)."""
        return cls(space.filler_np, "vocab")

    @classmethod
    def from_text_files(
        cls,
        files: Sequence[str],
        tokenizer,
        text_field: str = "text",
        exclude_ids: Iterable[int] | None = None,
        cache_dir: str | None = None,
    ) -> "Haystack":
        """Load local files with `datasets.load_dataset(builder, data_files=files)` (builder from the suffix: .txt ->
        "text", one row per line; .jsonl/.json -> "json"; .parquet -> "parquet"), tokenize them once without special
        tokens and concatenate into one stream. `exclude_ids` (default: the tokenizer's specials and the markers
        TokenSpace.from_tokenizer picks) are dropped from the stream, so markers appear only where the generator
        puts them and every sample's layout stays unambiguous."""
        import datasets

        builder = text_builder(list(map(str, files)))
        options = {"keep_linebreaks": True} if builder == "text" else {}
        rows = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **options
        )
        if builder == "text":
            text_field = "text"  # the text builder has exactly this column
        elif text_field not in rows.column_names:
            raise ConfigError(
                f"data.text_field={text_field!r} is not a column of data.text_files; columns: {rows.column_names}"
            )
        # documents (json/parquet rows) are separated like paragraphs; text lines already end in their line break
        separator = "" if builder == "text" else "\n\n"
        pieces = []
        for batch in rows.iter(batch_size=_TOKENIZE_BATCH):
            texts = [t + separator for t in batch[text_field] if t]
            if texts:
                encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
                pieces.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
        stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32)
        if exclude_ids is None:
            exclude_ids = (
                set(tokenizer.all_special_ids) | set(bos_pad_ids(tokenizer)) | set(find_markers(tokenizer).values())
            )
        exclude = np.fromiter(exclude_ids, dtype=np.int64)
        if exclude.size:
            stream = stream[~np.isin(stream, exclude)]
        if stream.size == 0:
            raise ConfigError(
                f"data.text_files {list(files)} hold no text in field {text_field!r}; give non-empty files"
            )
        return cls(stream, "text")

    @classmethod
    def from_config(cls, cfg: DataConfig, space: TokenSpace, tokenizer=None) -> "Haystack":
        """The haystack `cfg.haystack` asks for; "text" needs the tokenizer that `space` was built from."""
        if cfg.haystack == "vocab":
            return cls.from_vocab(space)
        if tokenizer is None:
            raise ConfigError(
                "data.haystack=text needs a tokenizer to tokenize data.text_files; use data.haystack=vocab"
            )
        exclude = {space.bos_id, space.pad_id, *space.marker_ids, *tokenizer.all_special_ids}
        return cls.from_text_files(cfg.text_files, tokenizer, cfg.text_field, exclude_ids=exclude)
