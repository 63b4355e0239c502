"""Haystack: i.i.d. vocabulary filler, and windows of a local corpus loaded with datasets and tokenized once."""

import json

import numpy as np
import pytest

from flashmorph.data import DataConfig, Haystack, TokenSpace
from flashmorph.errors import ConfigError


def test_vocab_haystack_draws_filler_ids_deterministically():
    space = TokenSpace.synthetic(64)
    haystack = Haystack.from_vocab(space)
    a = haystack.sample(np.random.default_rng(3), 5000)
    b = haystack.sample(np.random.default_rng(3), 5000)
    assert a.dtype == np.int64 and a.shape == (5000,)
    assert np.array_equal(a, b)
    assert set(a.tolist()) == set(space.filler_ids.tolist())
    assert haystack.sample(np.random.default_rng(3), 0).shape == (0,)


def test_text_windows_are_contiguous_and_wrap_around():
    haystack = Haystack(np.arange(10, dtype=np.int32), "text")
    for seed in range(5):
        window = haystack.sample(np.random.default_rng(seed), 25)  # longer than the stream: wraps
        assert window.dtype == np.int64
        assert np.array_equal(np.diff(window) % 10, np.ones(24))


def test_text_file_is_tokenized_once_without_markers(word_tokenizer, corpus_lines, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines) + "\n")
    haystack = Haystack.from_text_files([str(corpus)], word_tokenizer, cache_dir=str(tmp_path / "cache"))
    everything = word_tokenizer(" ".join(corpus_lines), add_special_tokens=False)["input_ids"]
    space = TokenSpace.from_tokenizer(word_tokenizer)
    kept = [t for t in everything if t not in space.marker_ids]
    assert haystack.kind == "text" and haystack.tokens.tolist() == kept, "the corpus in order, markers dropped"
    assert len(kept) < len(everything)


def test_jsonl_corpus_with_a_text_field(word_tokenizer, corpus_lines, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(corpus_lines)))
    haystack = Haystack.from_text_files([str(corpus)], word_tokenizer, "body", cache_dir=str(tmp_path / "cache"))
    assert len(haystack) > 100
    with pytest.raises(ConfigError, match=r"data\.text_field"):
        Haystack.from_text_files([str(corpus)], word_tokenizer, "text", cache_dir=str(tmp_path / "cache"))


def test_from_config(word_tokenizer, corpus_lines, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines))
    space = TokenSpace.from_tokenizer(word_tokenizer)
    assert Haystack.from_config(DataConfig(), space).kind == "vocab"
    cfg = DataConfig(haystack="text", text_files=[str(corpus)])
    with pytest.raises(ConfigError, match=r"data\.haystack"):
        Haystack.from_config(cfg, space)
    haystack = Haystack.from_config(cfg, space, word_tokenizer)
    assert not set(haystack.tokens.tolist()) & {space.bos_id, space.pad_id, *space.marker_ids}
