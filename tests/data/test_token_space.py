"""TokenSpace: synthetic pools for tokenizer-less tiny models, and pools picked from a real (tiny, local) tokenizer."""

import pytest
import torch

from flashmorph.data import TokenSpace
from flashmorph.errors import ConfigError

from retrieval_helpers import KEY_WORDS, NUMBERS, build_word_tokenizer


def _disjoint(space: TokenSpace):
    pools = [set(space.key_ids.tolist()), set(space.value_ids.tolist()), set(space.filler_ids.tolist())]
    reserved = {space.bos_id, space.pad_id, *space.marker_ids}
    assert len(reserved) == 6
    for i, pool in enumerate(pools):
        assert not pool & reserved
        for other in pools[i + 1 :]:
            assert not pool & other
    every = torch.cat([space.key_ids, space.value_ids, space.filler_ids])
    assert every.min() >= 0 and every.max() < space.vocab_size


@pytest.mark.parametrize("vocab_size", [9, 64, 256, 32000])
def test_synthetic_pools_are_disjoint_and_cover_the_vocab(vocab_size):
    space = TokenSpace.synthetic(vocab_size)
    _disjoint(space)
    assert 6 + len(space.key_ids) + len(space.value_ids) + len(space.filler_ids) == vocab_size
    assert space.key_ids.dtype == torch.long


def test_synthetic_vocab_64_has_room_for_many_pairs():
    space = TokenSpace.synthetic(64)
    assert len(space.key_ids) >= 24 and len(space.value_ids) >= 24 and len(space.filler_ids) >= 8
    assert space.bos_id == 1 and space.pad_id == 0


def test_synthetic_too_small_vocab():
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenSpace.synthetic(8)


def test_from_tokenizer_picks_single_token_markers_and_word_pools(word_tokenizer):
    tok = word_tokenizer
    space = TokenSpace.from_tokenizer(tok)
    _disjoint(space)
    assert space.vocab_size == len(tok)
    assert space.bos_id == tok.bos_token_id and space.pad_id == tok.pad_token_id
    names = dict(
        zip(("kv_sep", "query", "needle", "assign"), tok.convert_ids_to_tokens(list(space.marker_ids)), strict=True)
    )
    assert names == {"kv_sep": "is", "query": "?", "needle": "key", "assign": "="}
    assert set(tok.convert_ids_to_tokens(space.key_ids.tolist())) == set(KEY_WORDS)
    assert set(tok.convert_ids_to_tokens(space.value_ids.tolist())) == set(NUMBERS)
    assert "The" in tok.convert_ids_to_tokens(space.filler_ids.tolist())
    again = TokenSpace.from_tokenizer(build_word_tokenizer())
    assert torch.equal(again.key_ids, space.key_ids) and torch.equal(again.value_ids, space.value_ids)


def test_from_tokenizer_without_a_marker_raises():
    words = ["<s>", "</s>", "<pad>", "<unk>", "cat", "dog", "1", "2"]  # no "is", ":", "?" ...
    with pytest.raises(ConfigError, match="marker"):
        TokenSpace.from_tokenizer(build_word_tokenizer(words))


def test_overlapping_pools_are_rejected():
    with pytest.raises(ConfigError, match="value_ids"):
        TokenSpace(16, 1, 0, 2, 3, 4, 5, key_ids=[6, 7], value_ids=[7, 8], filler_ids=[9])


def test_from_tokenizer_prefers_whole_words_as_keys():
    """With enough word-start tokens (sentencepiece "▁" here), subword pieces such as "pple" are not keys."""
    import itertools

    from tokenizers import decoders

    whole_words = ["▁" + "".join(letters) for letters in itertools.islice(itertools.product("abcdefgh", repeat=3), 70)]
    tok = build_word_tokenizer(
        ["<s>", "</s>", "<pad>", "<unk>", "is", "?", "=", "key", "pple", "ana", "7", *whole_words]
    )
    tok.backend_tokenizer.decoder = decoders.Metaspace()  # a lone "▁abc" decodes to "abc", as in Llama/Mistral
    space = TokenSpace.from_tokenizer(tok)
    assert sorted(tok.convert_ids_to_tokens(space.key_ids.tolist())) == sorted(whole_words)
    assert {"pple", "ana"} <= set(tok.convert_ids_to_tokens(space.filler_ids.tolist()))
