"""Fixtures of the evaluation tests: a tiny corpus, a word-level tokenizer trained on it, tiny model directories,
and an oracle model that predicts every next token perfectly."""

import random

import pytest
import torch
from torch import nn

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos as tiny_config sets them
# markers TokenSpace.from_tokenizer can pick (" is", " =", "?", " key"), words (keys) and numbers (values)
WORDS = ("is = ? key the cat dog owl fox bee ant elk yak emu hen cow pig bat eel cod apple pear plum lime fig "
         "kiwi on a").split() + [str(n) for n in range(20)]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads on a busy 2-core box; restored after every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """`datasets` caches what it loads (our local corpora, lm-eval's task data) under tmp, not the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A .txt corpus of ~1,200 words over WORDS (every word appears, so the tokenizer learns them all)."""
    rng = random.Random(0)
    lines = [" ".join(WORDS)] + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) for _ in range(80)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def word_tokenizer(corpus_file):
    """A WordLevel tokenizer trained on the corpus (vocab <= 64, the tiny models' size), as a HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train([str(corpus_file)], trainers.WordLevelTrainer(vocab_size=64, special_tokens=SPECIALS))
    assert backend.get_vocab_size() <= 64
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_model():
    """The shared tiny random Llama (2 layers, hidden 32, vocab 64), fp32, eval mode."""
    from flashmorph.model.tiny import build_tiny_model, tiny_config

    return build_tiny_model(tiny_config("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2), seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_model, word_tokenizer):
    """tiny_model saved as a HF directory with the word tokenizer."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bare_model_dir(tmp_path_factory, tiny_model):
    """tiny_model saved with no tokenizer (retrieval falls back to synthetic ids)."""
    path = tmp_path_factory.mktemp("bare_model")
    tiny_model.save_pretrained(path)
    return path


class NextTokenOracle(nn.Module):
    """Logits one-hot at the next input token: teacher-forced, the answers are the next tokens, so recall is 100%."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # [batch, seq, vocab]; every position, like a
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)  # module that ignores logits_to_keep
        return type("Output", (), {"logits": logits})()


@pytest.fixture
def oracle():
    return NextTokenOracle(64)
