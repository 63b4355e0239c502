"""Fixtures of the data tests: the tiny local tokenizer and a small corpus."""

import pytest

from retrieval_helpers import FILLER_WORDS, KEY_WORDS, MARKER_WORDS, NUMBERS, build_word_tokenizer


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="session")
def corpus_lines():
    """Lines mixing filler words, key words, numbers and marker words (the haystack must drop the markers)."""
    import random

    rng = random.Random(0)
    vocab = FILLER_WORDS * 4 + KEY_WORDS + NUMBERS + MARKER_WORDS
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 30))) for _ in range(60)]
