"""Mixture of synthetic retrieval and packed text: source of item i fixed by (seed, i), shares exact per block."""

import numpy as np
import pytest
import torch

from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace
from flashmorph.data.mixture import MixtureDataset, apportion, text_retrieval_mixture
from flashmorph.data.packed_text import PackedTextDataset
from flashmorph.data.text_corpus import TokenStream
from flashmorph.errors import ConfigError

SEQ_LEN = 34
IGNORE = -100


@pytest.fixture(scope="module")
def retrieval():
    cfg = DataConfig(seq_len=SEQ_LEN, num_pairs=8, kv_separator=False, seed=5)
    return RetrievalDataset(cfg, TokenSpace.synthetic(64))


def _text(seq_len=SEQ_LEN, seed=0):
    tokens = (np.arange(50 * seq_len + 7) * 7 % 58 + 6).astype(np.int32)  # ids 6..63, never -100 or BOS
    return PackedTextDataset(TokenStream(tokens, num_documents=1, eos_id=1), seq_len, seed=seed)


@pytest.fixture(scope="module")
def text():
    return _text()


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 2.0, 5.0)])
def test_shares_match_the_weights(retrieval, text, weights):
    sources = [(retrieval, weights[0]), (text, weights[1])]
    if len(weights) > 2:
        sources.append((_text(seed=1), weights[2]))
    mixture = MixtureDataset(sources, seed=0)
    drawn = np.array([mixture.source_of(i) for i in range(2000)])
    shares = np.bincount(drawn, minlength=len(weights)) / drawn.size
    np.testing.assert_allclose(shares, np.array(weights) / sum(weights), atol=0.02)
    assert len(set(drawn[:64].tolist())) == len(weights), "sources interleave, not one long run each"


def test_each_source_serves_its_own_indices_in_order(retrieval, text):
    mixture = MixtureDataset([(retrieval, 3.0), (text, 1.0)], seed=4, block_size=64)  # many blocks in 500 items
    seen = {0: [], 1: []}
    for i in range(500):
        source, local = mixture.locate(i)
        seen[source].append(local)
    assert seen[0] == list(range(len(seen[0]))) and seen[1] == list(range(len(seen[1])))
    for i in (0, 3, 77, 499):
        source, local = mixture.locate(i)
        expected = (retrieval, text)[source][local]
        assert all(torch.equal(mixture[i][key], expected[key]) for key in ("input_ids", "labels"))


def test_deterministic_by_seed(retrieval, text):
    indices = list(range(40)) + [123_456, 10**9]
    a = MixtureDataset([(retrieval, 0.5), (text, 0.5)], seed=9)
    b = MixtureDataset([(retrieval, 0.5), (text, 0.5)], seed=9)
    other = MixtureDataset([(retrieval, 0.5), (text, 0.5)], seed=10)
    assert [a.source_of(i) for i in indices] == [b.source_of(i) for i in reversed(indices)][::-1]
    assert torch.equal(a.batch(indices)["input_ids"], b.batch(indices)["input_ids"])
    assert [a.source_of(i) for i in indices] != [other.source_of(i) for i in indices]


def test_batch_format_matches_retrieval_batches(retrieval, text):
    mixture = text_retrieval_mixture(retrieval, text, text_weight=0.5, seed=1)
    assert mixture.names == ["retrieval", "text"]
    indices = list(range(16))
    batch = mixture.batch(indices)
    assert set(batch) == set(retrieval.batch([0])) == {"input_ids", "labels"}
    for value in batch.values():
        assert value.dtype == torch.long and value.shape == (16, SEQ_LEN)
    for row, i in enumerate(indices):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        if mixture.source_name(i) == "text":
            assert torch.equal(labels, ids), "text: every token is a target"
        else:
            answered = labels != IGNORE
            assert 0 < int(answered.sum()) < SEQ_LEN and torch.equal(labels[answered], ids[answered])


def test_text_weight_zero_or_one_keeps_one_source(retrieval, text):
    only_retrieval = text_retrieval_mixture(retrieval, None, 0.0)
    assert only_retrieval.names == ["retrieval"] and {only_retrieval.source_of(i) for i in range(100)} == {0}
    only_text = text_retrieval_mixture(retrieval, text, 1.0)
    assert only_text.names == ["text"] and torch.equal(only_text[3]["input_ids"], text[3]["input_ids"])


def test_apportion():
    assert apportion([1, 1, 1], 1024).tolist() == [342, 341, 341]
    assert apportion([0.7, 0.3], 1000).tolist() == [700, 300]
    counts = apportion([0.123, 5.0, 2.2], 777)
    assert counts.sum() == 777 and (counts >= 0).all()


def test_errors(retrieval, text):
    with pytest.raises(ConfigError, match="at least one"):
        MixtureDataset([])
    for weight in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ConfigError, match="weights must be positive"):
            MixtureDataset([(retrieval, 1.0), (text, weight)])
    with pytest.raises(ConfigError, match=r"different shapes .* same seq_len"):
        MixtureDataset([(retrieval, 1.0), (_text(seq_len=SEQ_LEN + 1), 1.0)])
    with pytest.raises(ConfigError, match="under one item in 1024"):
        MixtureDataset([(retrieval, 1.0), (text, 1e-4)])
    with pytest.raises(ConfigError, match="one name per source"):
        MixtureDataset([(retrieval, 1.0)], names=["a", "b"])
    with pytest.raises(ConfigError, match="needs a text dataset"):
        text_retrieval_mixture(retrieval, None, 0.5)
    with pytest.raises(IndexError):
        MixtureDataset([(retrieval, 1.0)]).locate(-1)
