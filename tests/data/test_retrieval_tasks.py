"""Task generators: exact lengths, BOS first, and labels on exactly the answer tokens the layout implies."""

import numpy as np
import pytest
import torch

from flashmorph.data import IGNORE_INDEX, TASK_NAMES, TASKS, DataConfig, Haystack, RetrievalDataset, TokenSpace

from retrieval_helpers import expected_labels

SPACE = TokenSpace.synthetic(64)


def _config(task: str, value_len: int, extra: int) -> DataConfig:
    cfg = DataConfig(tasks={task: 1.0}, num_pairs=5, num_queries=3, value_len=value_len, num_values=3, chain_len=3)
    cfg.seq_len = cfg.min_seq_len(task) + extra
    return cfg


def test_registry_covers_every_task():
    assert tuple(TASKS) == TASK_NAMES


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("value_len", [1, 2])
@pytest.mark.parametrize("extra", [0, 1, 37, 4096])  # 0: no filler at all (the tiny-teacher layout)
def test_layout_length_and_labels(task, value_len, extra):
    cfg = _config(task, value_len, extra)
    if extra == 4096:
        cfg.seq_len = 4096
    cfg.validate(space=SPACE)
    haystack = Haystack.from_vocab(SPACE)
    fillers = set(SPACE.filler_ids.tolist())
    for seed in range(4):
        input_ids, labels = TASKS[task](np.random.default_rng(seed), SPACE, cfg, haystack)
        assert input_ids.shape == labels.shape == (cfg.seq_len,)
        assert input_ids.dtype == labels.dtype == torch.long
        assert input_ids[0] == SPACE.bos_id
        want, structural = expected_labels(task, input_ids, SPACE, cfg)
        assert labels.tolist() == want
        assert labels[-1] != IGNORE_INDEX, "the sample ends with its last answer token"
        filler = [t for i, t in enumerate(input_ids.tolist()) if i not in structural]
        assert len(filler) == cfg.seq_len - cfg.min_seq_len(task)
        assert set(filler) <= fillers


def test_mqar_without_filler_is_pairs_then_queries():
    cfg = DataConfig(num_pairs=4, num_queries=0)
    cfg.seq_len = cfg.min_seq_len("mqar")  # 1 + 4*3 + 1 + 4*3
    ids, labels = TASKS["mqar"](np.random.default_rng(0), SPACE, cfg, Haystack.from_vocab(SPACE))
    rows = ids[1:13].view(4, 3)  # [pair, (key, SEP, value)]
    assert (rows[:, 1] == SPACE.kv_sep_id).all()
    assert ids[13] == SPACE.query_id
    queries = ids[14:].view(4, 3)
    assert sorted(queries[:, 0].tolist()) == sorted(rows[:, 0].tolist()), "every pair asked once"
    assert (labels[14:].view(4, 3)[:, :2] == IGNORE_INDEX).all()


def test_content_lands_at_random_depths():
    cfg = DataConfig(tasks={"niah_single": 1.0}, seq_len=1024)
    haystack = Haystack.from_vocab(SPACE)
    depths = []
    for seed in range(200):
        ids, _ = TASKS["niah_single"](np.random.default_rng(seed), SPACE, cfg, haystack)
        depths.append((ids[:-5] == SPACE.needle_id).nonzero().item() / cfg.seq_len)
    assert min(depths) < 0.1 and max(depths) > 0.9 and 0.35 < float(np.mean(depths)) < 0.65


@pytest.mark.parametrize("task", TASK_NAMES)
def test_tokenizer_space_with_text_haystack(task, word_tokenizer, corpus_lines, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines) + "\n")
    space = TokenSpace.from_tokenizer(word_tokenizer)
    cfg = DataConfig(tasks={task: 1.0}, seq_len=300, num_pairs=6, haystack="text", text_files=[str(corpus)])
    haystack = Haystack.from_text_files(cfg.text_files, word_tokenizer, cache_dir=str(tmp_path / "cache"))
    dataset = RetrievalDataset(cfg, space, haystack)
    stream = set(haystack.tokens.tolist())
    for index in range(5):
        sample = dataset[index]
        want, structural = expected_labels(task, sample["input_ids"], space, cfg)
        assert sample["labels"].tolist() == want
        filler = [t for i, t in enumerate(sample["input_ids"].tolist()) if i not in structural]
        assert set(filler) <= stream
