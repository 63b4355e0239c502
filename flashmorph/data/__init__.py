"""Deterministic synthetic long-context retrieval data (MQAR, NIAH variants, variable tracking), answer-only labels;
packed natural text and the mixture of both for distillation."""

from flashmorph.data.byte_tokenizer import ByteTokenizer
from flashmorph.data.config import TASK_NAMES, DataConfig
from flashmorph.data.dataset import RetrievalDataset, collate
from flashmorph.data.haystack import Haystack
from flashmorph.data.length_schedule import LengthSchedule
from flashmorph.data.mixture import MixtureDataset, text_retrieval_mixture
from flashmorph.data.packed_text import PackedTextDataset
from flashmorph.data.tasks import (
    IGNORE_INDEX,
    TASKS,
    mqar,
    niah_multikey,
    niah_multivalue,
    niah_single,
    variable_tracking,
)
from flashmorph.data.text_config import TextDataConfig
from flashmorph.data.token_space import TokenSpace

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "LengthSchedule",
    "MixtureDataset",
    "PackedTextDataset",
    "TextDataConfig",
    "TASKS",
    "TASK_NAMES",
    "DataConfig",
    "Haystack",
    "RetrievalDataset",
    "TokenSpace",
    "collate",
    "mqar",
    "niah_multikey",
    "niah_multivalue",
    "niah_single",
    "text_retrieval_mixture",
    "variable_tracking",
]
