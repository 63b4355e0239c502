"""Perplexity: exp of the hand-computed mean NLL, for one window and for overlapping windows; clear errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from flashmorph.errors import ConfigError
from flashmorph.evaluation import PerplexityConfig, evaluate_perplexity, load_eval_tokenizer
from flashmorph.evaluation.perplexity import load_token_stream, sliding_windows


def hand_ids(corpus_file, tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.bos_token_id] + tokenizer(corpus_file.read_text(), add_special_tokens=False)
                        ["input_ids"])


def test_stream_is_bos_then_the_file(corpus_file, word_tokenizer):
    stream = load_token_stream(PerplexityConfig(text_files=[str(corpus_file)]), word_tokenizer)
    assert torch.equal(stream, hand_ids(corpus_file, word_tokenizer))
    capped = load_token_stream(PerplexityConfig(text_files=[str(corpus_file)], max_tokens=50), word_tokenizer)
    assert torch.equal(capped, stream[:50])


def test_one_window_is_exp_of_mean_nll(tiny_model, corpus_file, word_tokenizer):
    ids = hand_ids(corpus_file, word_tokenizer)[:200]
    with torch.no_grad():
        nll = F.cross_entropy(tiny_model(input_ids=ids[None]).logits[0, :-1], ids[1:])
    cfg = PerplexityConfig(text_files=[str(corpus_file)], window=256, max_tokens=200)
    result = evaluate_perplexity(tiny_model, word_tokenizer, cfg, show_progress=False)
    assert result["scored_tokens"] == 199 and result["windows"] == 1
    assert result["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_sliding_windows_score_each_token_once_with_most_context(tiny_model, corpus_file, word_tokenizer):
    ids = hand_ids(corpus_file, word_tokenizer)[:101]
    window, stride = 32, 12
    total, count, scored_until = 0.0, 0, 1
    with torch.no_grad():  # by hand: each window scores the tokens no earlier window scored
        for begin in range(0, 100, stride):
            end = min(begin + window, 101)
            logp = tiny_model(input_ids=ids[None, begin:end]).logits[0].log_softmax(-1)
            for pos in range(max(scored_until, begin + 1), end):
                total -= logp[pos - begin - 1, ids[pos]].item()
                count += 1
            scored_until = max(scored_until, end)
            if end == 101:
                break
    cfg = PerplexityConfig(text_files=[str(corpus_file)], window=window, stride=stride, batch_size=3, max_tokens=101)
    result = evaluate_perplexity(tiny_model, word_tokenizer, cfg, show_progress=False)
    assert count == 100 and result["scored_tokens"] == 100
    assert result["mean_nll"] == pytest.approx(total / count, rel=1e-5)


def test_windows_tile_the_stream():
    for n, window, stride in [(10, 4, 4), (10, 4, 1), (11, 5, 3), (3, 8, 8)]:
        scored = [p for _, end, first in sliding_windows(n, window, stride) for p in range(first, end)]
        assert len(scored) == len(set(scored))
        if stride < window:
            assert scored == list(range(1, n))


def test_jsonl_documents_are_joined_by_eos(tmp_path, word_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": text}) for text in ["the cat is 3", "a dog = 4"]) + "\n")
    stream = load_token_stream(PerplexityConfig(text_files=[str(path)], text_field="body"), word_tokenizer)
    encode = word_tokenizer.encode
    bos, eos = word_tokenizer.bos_token_id, word_tokenizer.eos_token_id
    expected = [bos] + encode("the cat is 3", add_special_tokens=False) + [eos] + encode("a dog = 4",
                                                                                       add_special_tokens=False)
    assert stream.tolist() == expected
    with pytest.raises(ConfigError, match="'text' is not a column"):
        load_token_stream(PerplexityConfig(text_files=[str(path)]), word_tokenizer)


def test_model_dir_without_tokenizer_is_a_clear_error(bare_model_dir):
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_eval_tokenizer(bare_model_dir, "perplexity")


@pytest.mark.parametrize("changes, message", [
    ({"window": 1}, "window"), ({"stride": 0}, "stride"), ({"stride": 9}, "stride"),
    ({"text_files": ["missing.txt"]}, "does not exist"), ({"text_files": ["corpus.csv"]}, "unsupported suffix"),
])
def test_bad_config_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        PerplexityConfig(**({"text_files": ["x.txt"], "window": 8} | changes)).validate()
