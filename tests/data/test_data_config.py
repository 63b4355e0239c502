"""DataConfig.validate: every invalid setting raises a one-line ConfigError naming its field."""

import pytest

from flashmorph.data import TASK_NAMES, DataConfig, RetrievalDataset, TokenSpace
from flashmorph.errors import ConfigError


def test_defaults_validate():
    DataConfig().validate(vocab_size=64)
    DataConfig(tasks={name: 1.0 for name in TASK_NAMES}).validate(vocab_size=64)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"tasks": {"mqa": 1.0}}, "data.tasks"),
        ({"tasks": {}}, "data.tasks"),
        ({"tasks": {"mqar": 0.0}}, "data.tasks"),
        ({"tasks": {"mqar": -1.0}}, "data.tasks"),
        ({"tasks": {"mqar": 0.0, "niah_single": 0.0}}, "data.tasks"),
        ({"seq_len": 10}, "data.seq_len"),
        ({"tasks": {"variable_tracking": 1.0}, "seq_len": 20}, "data.seq_len"),
        ({"value_len": 0}, "data.value_len"),
        ({"num_pairs": 0}, "data.num_pairs"),
        ({"num_queries": -1}, "data.num_queries"),
        ({"num_queries": 9}, "data.num_queries"),
        ({"seed": -3}, "data.seed"),
        ({"haystack": "web"}, "data.haystack"),
        ({"haystack": "text"}, "data.text_files"),
        ({"haystack": "text", "text_files": ["/nonexistent/corpus.txt"]}, "data.text_files"),
        # too few distinct ids in a 64-id synthetic vocabulary (24 keys, 25 values)
        ({"num_pairs": 30, "seq_len": 4096}, "data.num_pairs"),
        ({"tasks": {"niah_multikey": 1.0}, "num_pairs": 25, "seq_len": 4096}, "data.num_pairs"),
        ({"tasks": {"variable_tracking": 1.0}, "chain_len": 13, "seq_len": 4096}, "data.chain_len"),
        ({"tasks": {"niah_multivalue": 1.0}, "num_values": 26, "seq_len": 4096}, "data.num_values"),
    ],
)
def test_invalid_settings_raise_config_error(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        DataConfig(**overrides).validate(vocab_size=64)
    assert "\n" not in str(info.value)


def test_seq_len_message_names_the_minimum_and_the_fix():
    cfg = DataConfig(seq_len=10)  # mqar, 8 pairs: BOS + 8*3 + QUERY + 8*3 = 50
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == (
        "data.seq_len=10 is too short for task mqar (needs >= 50); raise data.seq_len or lower data.num_pairs"
    )


def test_unsupported_or_mixed_text_files(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"data\.text_files"):
        DataConfig(haystack="text", text_files=[str(tmp_path / "a.csv")]).validate()
    with pytest.raises(ConfigError, match=r"data\.text_files"):
        DataConfig(haystack="text", text_files=[str(tmp_path / "b.txt"), str(tmp_path / "c.jsonl")]).validate()
    DataConfig(haystack="text", text_files=[str(tmp_path / "b.txt")]).validate()


def test_pool_check_uses_the_given_space():
    cfg = DataConfig(num_pairs=30, seq_len=4096)
    cfg.validate()  # no vocabulary given: pools unchecked
    cfg.validate(space=TokenSpace.synthetic(256))
    with pytest.raises(ConfigError, match=r"data\.num_pairs"):
        cfg.validate(space=TokenSpace.synthetic(64))


def test_dataset_validates_and_needs_a_text_haystack(tmp_path):
    space = TokenSpace.synthetic(64)
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        RetrievalDataset(DataConfig(seq_len=8), space)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    with pytest.raises(ConfigError, match=r"data\.haystack"):
        RetrievalDataset(DataConfig(haystack="text", text_files=[str(corpus)]), space)


def test_min_seq_len_matches_the_layout():
    cfg = DataConfig(num_pairs=3, num_queries=2, value_len=2, num_values=3, chain_len=2)
    assert cfg.min_seq_len("mqar") == 1 + 3 * 4 + 1 + 2 * 4
    assert cfg.min_seq_len("niah_single") == 1 + 5 + 5
    assert cfg.min_seq_len("niah_multikey") == 1 + 3 * 5 + 5
    assert cfg.min_seq_len("niah_multivalue") == 1 + 3 * 5 + 3 + 3 * 2
    assert cfg.min_seq_len("variable_tracking") == 1 + 2 * (5 + 4) + 1 + 2 + 1 + 2
