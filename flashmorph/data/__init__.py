"""Deterministic synthetic long-context retrieval data (MQAR, NIAH variants, variable tracking), answer-only labels;
packed natural text and the mixture of both for distillation."""

import importlib

# name -> submodule; imported on first use, so `flashmorph.data.config` (read while validating a recipe) does not
# pull in torch and numpy through the dataset modules
_EXPORTS = {
    "ByteTokenizer": "byte_tokenizer",
    "TASK_NAMES": "config",
    "DataConfig": "config",
    "RetrievalDataset": "dataset",
    "collate": "dataset",
    "Haystack": "haystack",
    "LengthSchedule": "length_schedule",
    "MixtureDataset": "mixture",
    "text_retrieval_mixture": "mixture",
    "PackedTextDataset": "packed_text",
    "IGNORE_INDEX": "tasks",
    "TASKS": "tasks",
    "mqar": "tasks",
    "niah_multikey": "tasks",
    "niah_multivalue": "tasks",
    "niah_single": "tasks",
    "variable_tracking": "tasks",
    "TextDataConfig": "text_config",
    "TokenSpace": "token_space",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flashmorph.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flashmorph.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
