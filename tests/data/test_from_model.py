"""Token space for a model directory: a model without a tokenizer gets synthetic ids, and one log line says so."""

import dataclasses
import logging

import pytest

from flashmorph.data import DataConfig
from flashmorph.data.from_model import _note_synthetic, data_for_model
from flashmorph.errors import ConfigError


def test_a_model_without_tokenizer_gets_synthetic_ids_and_one_line_saying_so(tmp_path, caplog):
    _note_synthetic.cache_clear()
    cfg = DataConfig(tasks={"mqar": 1.0}, seq_len=34, num_pairs=8)
    with caplog.at_level(logging.INFO, logger="flashmorph.data.from_model"):
        for seq_len in (34, 64):  # a length schedule asks once per length
            space, haystack = data_for_model(tmp_path, dataclasses.replace(cfg, seq_len=seq_len), 64)
    assert haystack is None and space.vocab_size == 64
    notes = [r.getMessage() for r in caplog.records if "no tokenizer" in r.getMessage()]
    assert notes == [f"{tmp_path} has no tokenizer (tokenizer.json, tokenizer.model, tokenizer_config.json): data "
                     "uses a synthetic token space of the model's 64 ids"]
    with pytest.raises(ConfigError, match="data.haystack=text needs a tokenizer"):
        data_for_model(tmp_path, dataclasses.replace(cfg, haystack="text"), 64)
