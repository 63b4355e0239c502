"""A deterministic weighted mixture of map-style datasets (synthetic retrieval + packed text for distillation).

Batches have RetrievalDataset.batch's format, {"input_ids", "labels"} [B, T] long, -100 = ignored, and no other key.
Choice made for the distiller: KL runs on every position of every sample, with no mask. That is exact because no
source pads (every sample has exactly seq_len tokens); labels (-100 outside retrieval answers, the ids themselves
for text) serve the CE / recall terms only. A source that ever pads must come with an explicit mask."""

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from flashmorph.data.dataset import VIRTUAL_LENGTH, collate, split_id
from flashmorph.errors import ConfigError

_MIXTURE_TAG = split_id("mixture")  # keeps the mixture's draws apart from the sources' own streams of the same seed
DEFAULT_BLOCK = 1024


def apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder; ties to the earlier source)."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    remainders = shares - counts
    order = sorted(range(len(counts)), key=lambda s: (-remainders[s], s))
    counts[order[: total - int(counts.sum())]] += 1
    return counts


class MixtureDataset(Dataset):
    """Item i comes from source s with probability weight_s, decided by (seed, i). Stratified: each block of
    `block_size` consecutive indices holds exactly apportion(weights, block_size) items of each source in an order
    drawn from (seed, block), so shares are exact per block and source s serves its own indices 0, 1, 2, ... in
    order: a packed-text source walks through its epoch instead of skipping windows. O(1) per item."""

    def __init__(
        self,
        sources: Sequence[tuple[Dataset, float]],
        seed: int = 0,
        block_size: int = DEFAULT_BLOCK,
        names: Sequence[str] | None = None,
    ):
        if not sources:
            raise ConfigError("mixture needs at least one (dataset, weight) source")
        for position, (_, weight) in enumerate(sources):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                raise ConfigError(f"mixture source {position} has weight {weight!r}; weights must be positive numbers")
        if seed < 0:
            raise ConfigError(f"mixture seed={seed} must be >= 0")
        if block_size < len(sources):
            raise ConfigError(f"mixture block_size={block_size} must be >= the number of sources ({len(sources)})")
        if names is not None and len(names) != len(sources):
            raise ConfigError(f"mixture names {list(names)} must give one name per source ({len(sources)})")
        self.names = list(names) if names is not None else [f"source_{s}" for s in range(len(sources))]
        self.datasets = [dataset for dataset, _ in sources]
        self.weights = np.array([float(weight) for _, weight in sources])
        self.seed, self.block_size = seed, block_size
        self.counts = apportion(self.weights, block_size)  # [num_sources] items per block
        if (self.counts == 0).any():
            rare = int(np.flatnonzero(self.counts == 0)[0])
            raise ConfigError(
                f"mixture source {rare} has weight {self.weights[rare]:g}, under one item in {block_size}; "
                "raise its weight or drop the source"
            )
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._check_formats()

    def _check_formats(self) -> None:
        shapes = []
        for dataset in self.datasets:
            sample = dataset[0]
            shapes.append({key: tuple(value.shape) for key, value in sample.items()})
        if any(shape != shapes[0] for shape in shapes):
            raise ConfigError(
                f"mixture sources give samples of different shapes {shapes}; build every source with the same seq_len"
            )

    def __len__(self) -> int:
        return VIRTUAL_LENGTH

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, rank of the position among its source's positions), both [block_size]."""
        cached = self._blocks.get(block)
        if cached is None:
            rng = np.random.default_rng([self.seed, _MIXTURE_TAG, block])
            source = rng.permutation(np.repeat(np.arange(len(self.datasets)), self.counts))
            rank = np.empty(self.block_size, dtype=np.int64)
            for s in range(len(self.datasets)):
                positions = np.flatnonzero(source == s)
                rank[positions] = np.arange(positions.size)
            cached = self._blocks[block] = (source, rank)
            if len(self._blocks) > 4:  # a batch or a few DataLoader workers touch at most a couple of blocks
                self._blocks.popitem(last=False)
        return cached

    def locate(self, index: int) -> tuple[int, int]:
        """(source, index within the source) of item `index`; a finite source is cycled."""
        if not 0 <= index < VIRTUAL_LENGTH:
            raise IndexError(f"index {index} is outside [0, {VIRTUAL_LENGTH})")
        block, position = divmod(int(index), self.block_size)
        source, rank = self._block(block)
        s = int(source[position])
        local = block * int(self.counts[s]) + int(rank[position])
        return s, local % len(self.datasets[s])

    def source_of(self, index: int) -> int:
        """Which source item `index` comes from (for per-source losses and logs), without building it."""
        return self.locate(index)[0]

    def source_name(self, index: int) -> str:
        """The name of item `index`'s source ("retrieval" / "text" in the distillation mixture)."""
        return self.names[self.source_of(index)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, local = self.locate(index)
        return self.datasets[s][local]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Items `indices` stacked: {"input_ids": [B, T], "labels": [B, T]}."""
        return collate([self[i] for i in indices])


def text_retrieval_mixture(
    retrieval: Dataset, text: Dataset | None, text_weight: float, seed: int = 0
) -> MixtureDataset:
    """The distillation mixture of sources named "retrieval" (share 1 - text_weight) and "text" (share text_weight,
    TextDataConfig.weight); a share of 0 drops that source."""
    if not 0.0 <= text_weight <= 1.0:
        raise ConfigError(f"text.weight={text_weight!r} must lie in [0, 1] (the share of text samples)")
    if text_weight > 0 and text is None:
        raise ConfigError(f"text.weight={text_weight} needs a text dataset; build one or set text.weight=0")
    sources = [("retrieval", retrieval, 1.0 - text_weight), ("text", text, text_weight)]
    kept = [(name, dataset, weight) for name, dataset, weight in sources if weight > 0]
    return MixtureDataset([(d, w) for _, d, w in kept], seed, names=[name for name, _, _ in kept])
