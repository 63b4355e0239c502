"""Map-style dataset of synthetic retrieval samples: item i is a pure function of (cfg.seed, split, i), so a resumed
run (or any DataLoader worker) sees the same stream, and split="eval" gives a separate held-out stream."""

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from flashmorph.data.config import DataConfig
from flashmorph.data.haystack import Haystack
from flashmorph.data.tasks import TASKS
from flashmorph.data.token_space import TokenSpace
from flashmorph.errors import ConfigError

VIRTUAL_LENGTH = 2**31 - 1  # "unbounded": training draws indices 0, 1, 2, ... and never wraps


def split_id(split: str) -> int:
    """A stable number for a split name. Python's hash() of a str is salted per process, crc32 is not."""
    return zlib.crc32(split.encode("utf-8"))


class RetrievalDataset(Dataset):
    """dataset[i] -> {"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}; the task of item i is drawn
    from cfg.tasks' weights with the item's own generator, then the task generates from the same generator."""

    def __init__(self, cfg: DataConfig, space: TokenSpace, haystack: Haystack | None = None, split: str = "train"):
        cfg.validate(space=space)
        if haystack is None:
            if cfg.haystack == "text":
                raise ConfigError(
                    "data.haystack=text needs a Haystack; pass Haystack.from_config(cfg, space, tokenizer) as haystack"
                )
            haystack = Haystack.from_vocab(space)
        if not isinstance(split, str) or not split:
            raise ConfigError(f"split={split!r} must be a non-empty name such as 'train' or 'eval'")
        self.cfg, self.space, self.haystack, self.split = cfg, space, haystack, split
        self.split_id = split_id(split)
        self.task_names = tuple(cfg.tasks)
        weights = np.array([cfg.tasks[name] for name in self.task_names], dtype=np.float64)
        self._task_cdf = np.cumsum(weights / weights.sum())  # [num_tasks] for inverse-CDF sampling

    def __len__(self) -> int:
        return VIRTUAL_LENGTH

    def generator(self, index: int) -> np.random.Generator:
        """The generator of item `index`: PCG64 seeded by SeedSequence((seed, split, index)), which mixes the three
        into independent streams without hashing strings."""
        if not 0 <= index < VIRTUAL_LENGTH:
            raise IndexError(f"index {index} is outside [0, {VIRTUAL_LENGTH})")
        return np.random.default_rng([self.cfg.seed, self.split_id, int(index)])

    def _draw_task(self, rng: np.random.Generator) -> str:
        position = int(np.searchsorted(self._task_cdf, rng.random(), side="right"))
        return self.task_names[min(position, len(self.task_names) - 1)]  # min: cdf[-1] may round below 1.0

    def task_of(self, index: int) -> str:
        """The task item `index` belongs to (for per-task evaluation), without generating the sample."""
        return self._draw_task(self.generator(index))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.generator(index)
        input_ids, labels = TASKS[self._draw_task(rng)](rng, self.space, self.cfg, self.haystack)
        return {"input_ids": input_ids, "labels": labels}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Items `indices` stacked: {"input_ids": [B, T], "labels": [B, T]}."""
        return collate([self[i] for i in indices])


def collate(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples of equal length into [B, T] tensors (every sample of one config has exactly seq_len tokens)."""
    return {key: torch.stack([sample[key] for sample in batch]) for key in batch[0]}
