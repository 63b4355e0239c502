"""Which token ids the retrieval generator writes: BOS, structural markers, and disjoint key / value / filler pools.

Built either from a bare vocabulary size (tiny tokenizer-less models) or from a real HF tokenizer."""

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from flashmorph.errors import ConfigError

# synthetic layout: these ids come first, the rest of the vocabulary is split into keys / values / filler
SYNTHETIC_SPECIALS = {"pad_id": 0, "bos_id": 1, "kv_sep_id": 2, "query_id": 3, "needle_id": 4, "assign_id": 5}
SYNTHETIC_MIN_VOCAB = len(SYNTHETIC_SPECIALS) + 3  # one key, one value, one filler id

# strings tried in order for each marker of a real tokenizer; the first that encodes to one unused token wins.
# They make samples read like "\n key7 is 42 ... ? key7 is 42" and "x = y", which real LMs parse easily.
MARKER_CANDIDATES = {
    "kv_sep_id": (" is", ":", " :", "is", "->"),
    "assign_id": (" =", "=", " equals", "equals", ":="),
    "query_id": ("?", " ?", " query", "query", "Q"),
    "needle_id": ("\n", " key", "key", "#", "*"),
}
_KEY_WORD = re.compile(r"[a-z]{3,12}")  # single-token lowercase words serve as keys and variable names
_VALUE_NUMBER = re.compile(r"[0-9]{1,4}")  # single-token numbers serve as values
MIN_WORD_START_KEYS = 64  # below this many whole-word tokens (toy vocabularies) subword pieces serve as keys too


def _long(ids) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(-1))


@dataclass(eq=False)
class TokenSpace:
    vocab_size: int  # every id lies in [0, vocab_size)
    bos_id: int  # first token of every sample
    pad_id: int  # never written inside a sample; for callers that pad batches of unequal length
    kv_sep_id: int  # between a key and its value: "k SEP v"
    query_id: int  # opens the question section at the end of a sample
    needle_id: int  # opens a needle hidden in the haystack: "NEEDLE k SEP v"
    assign_id: int  # variable tracking: "NEEDLE x ASSIGN y"
    key_ids: torch.Tensor  # [num_keys] ids used as keys and variable names
    value_ids: torch.Tensor  # [num_values] ids used as values
    filler_ids: torch.Tensor  # [num_filler] ids of the vocabulary haystack
    # numpy views of the pools: per-sample generation runs in numpy, whose per-call overhead is ~5x below torch's
    key_np: np.ndarray = field(init=False, repr=False)
    value_np: np.ndarray = field(init=False, repr=False)
    filler_np: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.key_ids, self.value_ids, self.filler_ids = (
            _long(p) for p in (self.key_ids, self.value_ids, self.filler_ids)
        )
        self.key_np, self.value_np, self.filler_np = (
            p.numpy() for p in (self.key_ids, self.value_ids, self.filler_ids)
        )
        markers = [self.bos_id, *self.marker_ids]
        if len(set(markers)) != len(markers):
            raise ConfigError(f"token space: bos/markers {markers} must be distinct ids")
        pools = {"key_ids": self.key_np, "value_ids": self.value_np, "filler_ids": self.filler_np}
        everything = np.concatenate([np.array(markers + [self.pad_id]), *pools.values()])
        if everything.size and (everything.min() < 0 or everything.max() >= self.vocab_size):
            raise ConfigError(f"token space: ids must lie in [0, vocab_size={self.vocab_size})")
        # disjoint pools are what keep every sample's layout unambiguous (a filler id never looks like a key)
        reserved = set(markers) | {self.pad_id}
        seen: set[int] = set()
        for name, pool in pools.items():
            ids = set(pool.tolist())
            if len(ids) != len(pool) or ids & seen or ids & reserved:
                raise ConfigError(
                    f"token space: {name} must hold distinct ids, disjoint from the other pools and markers"
                )
            seen |= ids

    @property
    def marker_ids(self) -> tuple[int, int, int, int]:
        """The structural ids that must never appear in a haystack."""
        return (self.kv_sep_id, self.query_id, self.needle_id, self.assign_id)

    @classmethod
    def synthetic(cls, vocab_size: int) -> "TokenSpace":
        """Ids 0..5 are pad, bos, SEP, QUERY, NEEDLE, ASSIGN; the rest split into ~5/12 keys, ~5/12 values, ~1/6 filler
        (vocab 64: keys 6..29, values 30..54, filler 55..63)."""
        if vocab_size < SYNTHETIC_MIN_VOCAB:
            raise ConfigError(
                f"vocab_size={vocab_size} is too small for synthetic retrieval data; use >= {SYNTHETIC_MIN_VOCAB}"
            )
        first = len(SYNTHETIC_SPECIALS)
        rest = vocab_size - first
        num_filler = max(1, rest // 6)  # filler only needs variety, keys and values need room for many pairs
        num_keys = (rest - num_filler) // 2
        num_values = rest - num_filler - num_keys
        ids = np.arange(first, vocab_size)
        return cls(
            vocab_size=vocab_size,
            **SYNTHETIC_SPECIALS,
            key_ids=ids[:num_keys],
            value_ids=ids[num_keys : num_keys + num_values],
            filler_ids=ids[num_keys + num_values :],
        )

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenSpace":
        """Markers from single-token strings (MARKER_CANDIDATES), keys from single-token lowercase words, values from
        single-token numbers, filler from every other non-special id. Deterministic for a given tokenizer."""
        bos_id, pad_id = bos_pad_ids(tokenizer)
        markers = find_markers(tokenizer)
        vocab_size = len(tokenizer)
        reserved = set(tokenizer.all_special_ids) | {bos_id, pad_id} | set(markers.values())
        candidates = [i for i in range(vocab_size) if i not in reserved]
        texts = tokenizer.batch_decode([[i] for i in candidates])
        word_start = _word_starts(candidates, texts, tokenizer.convert_ids_to_tokens(candidates))
        keys = _dedup_by_text(candidates, texts, word_start, _KEY_WORD, prefer_word_start=True)
        values = _dedup_by_text(candidates, texts, word_start, _VALUE_NUMBER, prefer_word_start=False)
        taken = set(keys) | set(values)
        filler = [i for i in candidates if i not in taken]
        return cls(
            vocab_size=vocab_size,
            bos_id=bos_id,
            pad_id=pad_id,
            **markers,
            key_ids=keys,
            value_ids=values,
            filler_ids=filler,
        )


def find_markers(tokenizer) -> dict[str, int]:
    """The marker ids of `tokenizer`: for each marker, the first candidate string that encodes to one new token."""
    taken = set(tokenizer.all_special_ids) | set(bos_pad_ids(tokenizer))
    markers = {}
    for name, candidates in MARKER_CANDIDATES.items():
        for text in candidates:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in taken:
                markers[name] = ids[0]
                taken.add(ids[0])
                break
        else:
            raise ConfigError(
                f"tokenizer has no single-token encoding for the {name[:-3]} marker among {candidates}; "
                "add one of them to the tokenizer"
            )
    return markers


def bos_pad_ids(tokenizer) -> tuple[int, int]:
    """BOS (falling back to EOS, as many chat models have no BOS) and pad (falling back to EOS, then BOS)."""
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos_id is None:
        raise ConfigError("tokenizer has neither bos_token nor eos_token; set tokenizer.bos_token before building data")
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, bos_id) if i is not None)
    return bos_id, pad_id


def _word_starts(ids: list[int], texts: list[str], raw: list[str]) -> set[int]:
    """Ids that begin a word: decoded with a leading space (byte-level BPE) or spelled with the sentencepiece / GPT-2
    space mark (a lone sentencepiece token decodes without its space)."""
    return {
        i
        for i, text, piece in zip(ids, texts, raw, strict=True)
        if text.startswith(" ") or (piece or "").startswith(("▁", "Ġ"))
    }


def _dedup_by_text(
    ids: list[int], texts: list[str], word_start: set[int], pattern: re.Pattern, prefer_word_start: bool
) -> list[int]:
    """Ids whose decoded text (stripped) matches `pattern`, one per text ("cat" and " cat" would read alike), the
    word-start form first, then the lowest id; sorted by id. With prefer_word_start, subword pieces ("pple") are
    dropped whenever the vocabulary has MIN_WORD_START_KEYS whole words, so keys read as words."""
    best: dict[str, tuple[bool, int]] = {}  # text -> (is a subword piece, id): min() prefers word starts, then low ids
    for i, text in zip(ids, texts, strict=True):
        word = text.strip()
        if pattern.fullmatch(word):
            best[word] = min(best.get(word, (True, i)), (i not in word_start, i))
    chosen = list(best.values())
    if prefer_word_start and sum(not is_piece for is_piece, _ in chosen) >= MIN_WORD_START_KEYS:
        chosen = [(is_piece, i) for is_piece, i in chosen if not is_piece]
    return sorted(i for _, i in chosen)
