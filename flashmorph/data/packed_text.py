"""Map-style dataset of natural text packed to length: the corpus stream (documents + EOS) cut into windows of exactly
seq_len tokens; item i is a pure function of (seed, i), so a resumed run sees the same stream.

Packing is the standard pretraining one: a window is a plain slice of the stream, so it usually starts mid-document
(no BOS) and may span several documents; position ids stay continuous (0..seq_len-1, the model's default) and no
attention mask separates documents. Effects: tokens after an EOS attend to the previous document (the model has to
learn that EOS starts a new context, as in Llama/GPT pretraining); teacher and student see the same windows, so KL
compares like with like; and a window of short documents holds shorter dependencies than its length, so a
long-context stage should feed long documents (books, code files). The last tokens % seq_len tokens are never used."""

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from flashmorph.data.dataset import VIRTUAL_LENGTH, collate, split_id
from flashmorph.data.text_config import TextDataConfig
from flashmorph.data.text_corpus import TokenStream, tokenize_corpus
from flashmorph.errors import ConfigError

log = logging.getLogger(__name__)

_STREAM_TAG = split_id("packed_text")  # keeps the window permutations apart from other streams of the same seed
TOY_CORPUS_NAME = "toy_corpus.jsonl"


class PackedTextDataset(Dataset):
    """dataset[i] -> {"input_ids": LongTensor[seq_len], "labels": the same ids} (HF convention, the model shifts;
    every token counts). Epoch e = indices [e·W, (e+1)·W) for W = num_windows visits every window once, in the
    order of a permutation seeded by (seed, e); shuffle=False keeps stream order. Length is unbounded like
    RetrievalDataset's: indices past the first epoch start the next one."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int = 0, shuffle: bool = True):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len={seq_len!r} must be a positive number of tokens")
        if seed < 0:
            raise ConfigError(f"text.seed={seed} must be >= 0")
        num_tokens = int(stream.tokens.size)
        self.num_windows = num_tokens // seq_len
        if self.num_windows == 0:
            raise ConfigError(
                f"the text corpus has {num_tokens} tokens ({stream.num_documents} documents, EOS included), fewer "
                f"than seq_len={seq_len}; add documents to text.files or lower seq_len"
            )
        self.stream, self.seq_len, self.seed, self.shuffle = stream, seq_len, seed, shuffle
        self.windows = stream.tokens[: self.num_windows * seq_len].reshape(self.num_windows, seq_len)  # a view
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()  # epoch -> order; the last two are kept
        log.info("packed text: %d tokens -> %d windows of %d tokens", num_tokens, self.num_windows, seq_len)

    @classmethod
    def from_config(
        cls, cfg: TextDataConfig, tokenizer, seq_len: int, work_dir: str | Path | None = None
    ) -> "PackedTextDataset":
        """Tokenize cfg.files (or, with cfg.toy_corpus, the toy corpus written to work_dir, else cfg.cache_dir, else
        datasets' cache) with `tokenizer` (an HF tokenizer or a ByteTokenizer), cached by datasets; pack at seq_len."""
        files = cfg.files
        if cfg.toy_corpus:
            from flashmorph.data.toy_corpus import write_toy_corpus

            files = [str(write_toy_corpus(Path(_toy_dir(cfg, work_dir)) / TOY_CORPUS_NAME))]
        return cls(tokenize_corpus(cfg, tokenizer, files), seq_len, cfg.seed)

    @classmethod
    def from_model(
        cls, cfg: TextDataConfig, model_dir: str | Path, vocab_size: int, seq_len: int,
        work_dir: str | Path | None = None,
    ) -> "PackedTextDataset":
        """`from_config` with the model directory's tokenizer, or, for tokenizer-less models (the embedded teacher),
        the ByteTokenizer over TokenSpace.synthetic(vocab_size), the token space its retrieval data uses."""
        from flashmorph.data.from_model import has_tokenizer, load_tokenizer

        if has_tokenizer(model_dir):
            tokenizer = load_tokenizer(model_dir)
        else:
            from flashmorph.data.byte_tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer.synthetic(vocab_size)
        return cls.from_config(cfg, tokenizer, seq_len, work_dir)

    def with_seq_len(self, seq_len: int) -> "PackedTextDataset":
        """The same corpus packed at another length (a length-curriculum stage), sharing the tokenized stream."""
        return type(self)(self.stream, seq_len, self.seed, self.shuffle)

    def __len__(self) -> int:
        return VIRTUAL_LENGTH

    def window_of(self, index: int) -> int:
        """Which window of the stream item `index` is: tokens [w·seq_len, (w+1)·seq_len)."""
        if not 0 <= index < VIRTUAL_LENGTH:
            raise IndexError(f"index {index} is outside [0, {VIRTUAL_LENGTH})")
        epoch, position = divmod(int(index), self.num_windows)
        if not self.shuffle:
            return position
        order = self._permutations.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, _STREAM_TAG, epoch]).permutation(self.num_windows)
            self._permutations[epoch] = order
            if len(self._permutations) > 2:  # sequential reads only ever straddle one epoch boundary
                self._permutations.popitem(last=False)
        return int(order[position])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(self.windows[self.window_of(index)].astype(np.int64))
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Items `indices` stacked: {"input_ids": [B, T], "labels": [B, T]}."""
        return collate([self[i] for i in indices])


def _toy_dir(cfg: TextDataConfig, work_dir: str | Path | None) -> str | Path:
    if work_dir is not None:
        return work_dir
    if cfg.cache_dir is not None:
        return cfg.cache_dir
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "flashmorph"
