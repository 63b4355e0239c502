"""Deterministic synthetic long-context retrieval data (MQAR, NIAH variants, variable tracking), answer-only labels."""

from flashmorph.data.config import TASK_NAMES, DataConfig
from flashmorph.data.dataset import RetrievalDataset, collate
from flashmorph.data.haystack import Haystack
from flashmorph.data.tasks import (
    IGNORE_INDEX,
    TASKS,
    mqar,
    niah_multikey,
    niah_multivalue,
    niah_single,
    variable_tracking,
)
from flashmorph.data.token_space import TokenSpace

__all__ = [
    "IGNORE_INDEX",
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
    "variable_tracking",
]
