"""Text -> ids for models without a tokenizer (the embedded tiny teacher): UTF-8 bytes onto the filler pool.

The ids are the ones the vocabulary haystack draws from (TokenSpace.filler_ids), so text never produces a marker,
key or value id and reads to the model like retrieval filler. Meaningless as language: a toy that lets text-side
code paths (packing, mixtures, KL on all tokens) run on tokenizer-less models."""

from collections.abc import Sequence

import numpy as np

from flashmorph.data.token_space import TokenSpace


class ByteTokenizer:
    """The slice of the HF tokenizer interface that the corpus loaders call: `tok(texts)["input_ids"]`, `encode`,
    bos/eos/pad ids, `all_special_ids`, `len`. Byte b becomes filler_ids[b % num_filler]; deterministic, no state."""

    def __init__(self, space: TokenSpace):
        self.space = space
        self._ids_of_byte = space.filler_np[np.arange(256) % space.filler_np.size]  # [256] byte -> token id
        self.bos_token_id = space.bos_id
        self.eos_token_id = space.bos_id  # no EOS in the synthetic space: BOS doubles as the document boundary
        self.pad_token_id = space.pad_id

    @classmethod
    def synthetic(cls, vocab_size: int) -> "ByteTokenizer":
        return cls(TokenSpace.synthetic(vocab_size))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.space.pad_id, self.space.bos_id, *self.space.marker_ids]

    def __len__(self) -> int:
        return self.space.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False, **_) -> list[int]:
        return self._ids_of_byte[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)].tolist()

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = False, **_) -> dict[str, list]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(t) for t in texts]}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.space.vocab_size})"
