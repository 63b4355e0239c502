"""Retrieval recall: equals a hand count on the same held-out batch, 100% for an oracle, bad configs refused."""

import pytest
import torch

from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace
from flashmorph.errors import ConfigError
from flashmorph.evaluation import RetrievalEvalConfig, evaluate_retrieval

SPACE = TokenSpace.synthetic(64)


def small_config(**changes) -> RetrievalEvalConfig:
    fields = dict(tasks=["mqar", "niah_multikey"], lengths=[40, 56], samples=5, batch_size=2,
                  data=DataConfig(num_pairs=3))
    return RetrievalEvalConfig(**(fields | changes))


def hand_count(model, cfg: RetrievalEvalConfig, task: str, length: int) -> tuple[int, int, int]:
    """(correct answer tokens, answer tokens, samples with every answer token correct), from full logits."""
    data = DataConfig(tasks={task: 1.0}, seq_len=length, num_pairs=cfg.data.num_pairs)
    batch = RetrievalDataset(data, SPACE, split="eval").batch(range(cfg.samples))
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"]).logits[:, :-1].argmax(-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    correct = (predicted == targets) & mask
    exact = (correct.sum(1) == mask.sum(1)).sum()
    return int(correct.sum()), int(mask.sum()), int(exact)


def test_recall_equals_hand_count(tiny_model):
    cfg = small_config()
    result = evaluate_retrieval(tiny_model, SPACE, cfg, show_progress=False)
    assert [(c["task"], c["seq_len"]) for c in result["cells"]] == [
        ("mqar", 40), ("niah_multikey", 40), ("mqar", 56), ("niah_multikey", 56)]
    for cell in result["cells"]:
        assert 0.0 <= cell["token_accuracy"] <= 1.0 and 0.0 <= cell["exact_match"] <= 1.0
        hits, tokens, exact = hand_count(tiny_model, cfg, cell["task"], cell["seq_len"])
        assert (cell["answer_hits"], cell["answer_tokens"], cell["exact_samples"]) == (hits, tokens, exact)
        assert cell["token_accuracy"] == hits / tokens and cell["exact_match"] == exact / cfg.samples
    mqar = next(row for row in result["by_task"] if row["task"] == "mqar")
    cells = [c for c in result["cells"] if c["task"] == "mqar"]
    assert mqar["token_accuracy"] == sum(c["answer_hits"] for c in cells) / sum(c["answer_tokens"] for c in cells)
    assert result["overall"]["samples"] == 4 * cfg.samples


def test_oracle_gets_everything_right(oracle):
    cfg = small_config(tasks=["mqar", "niah_single", "niah_multivalue", "variable_tracking"], lengths=[48],
                       data=DataConfig(num_pairs=3, num_values=2, chain_len=2, value_len=2))
    result = evaluate_retrieval(oracle, SPACE, cfg, show_progress=False)
    for row in result["cells"] + result["by_task"] + result["by_length"] + [result["overall"]]:
        assert row["token_accuracy"] == 1.0 and row["exact_match"] == 1.0


@pytest.mark.parametrize("changes, message", [
    ({"split": "train"}, "training stream"),
    ({"lengths": [12]}, "too short for task mqar"),
    ({"tasks": ["needle"]}, "unknown"),
    ({"lengths": []}, "lengths"),
    ({"samples": 0}, "samples"),
])
def test_bad_config_is_refused(tiny_model, changes, message):
    with pytest.raises(ConfigError, match=message):
        evaluate_retrieval(tiny_model, SPACE, small_config(**changes), show_progress=False)
