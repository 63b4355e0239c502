"""The one check of a run's TP x SP x DP degrees: the layout, and whether a model's heads, kv heads, widths and
sequence length split by it. Torch-free, so recipes, the estimator and reshard ask it before anything is built."""

from __future__ import annotations

from dataclasses import dataclass

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.model.shape import ModelShape


@dataclass(frozen=True)
class DegreeNames:
    """What the user calls the degrees, so an error names the field they set (a recipe key, a CLI flag)."""

    tensor: str = "parallel.tensor_parallel"
    sequence: str = "parallel.sequence_parallel"
    world: str = "world_size"


RECIPE_NAMES = DegreeNames()


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of one run; tensor × sequence × data = world size. Rank order: TP innermost, then SP, then DP."""

    tensor: int  # megatron-core TP degree: ranks that split every projection matrix
    sequence: int  # Ulysses SP degree: ranks that split the sequence (and, inside attention, the heads)
    data: int  # data-parallel degree: ranks that see different samples (ZeRO shards over SP × DP)

    @property
    def world_size(self) -> int:
        return self.tensor * self.sequence * self.data

    def rank_of(self, tp_rank: int, sp_rank: int, dp_rank: int) -> int:
        # megatron-core's default order "tp-cp-ep-dp-pp": TP varies fastest, so TP peers share a node's NVLink
        return tp_rank + self.tensor * (sp_rank + self.sequence * dp_rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, sp_rank, dp_rank) of a global rank."""
        return rank % self.tensor, rank // self.tensor % self.sequence, rank // (self.tensor * self.sequence)

    def group_ranks(self, rank: int) -> dict[str, list[int]]:
        """The global ranks of `rank`'s TP, SP, DP and SP×DP groups, computed without any process group."""
        tp, sp, dp = self.coords(rank)
        return {
            "tp": [self.rank_of(t, sp, dp) for t in range(self.tensor)],
            "sp": [self.rank_of(tp, s, dp) for s in range(self.sequence)],
            "dp": [self.rank_of(tp, sp, d) for d in range(self.data)],
            "sdp": sorted(self.rank_of(tp, s, d) for s in range(self.sequence) for d in range(self.data)),
        }


def _check_degree(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r} must be an int >= 1")
    return value


def resolve_layout(tensor: int, sequence: int, world_size: int, names: DegreeNames = RECIPE_NAMES) -> ParallelLayout:
    """The layout for `world_size` ranks; the data-parallel degree is what TP × SP leave over."""
    tensor, sequence = _check_degree(names.tensor, tensor), _check_degree(names.sequence, sequence)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise FlashMorphError(f"{names.world}={world_size!r} must be an int >= 1")
    model_ranks = tensor * sequence
    if world_size % model_ranks:
        raise ConfigError(f"{names.world}={world_size} is not divisible by {names.tensor}={tensor} x "
                          f"{names.sequence}={sequence} = {model_ranks}; launch a multiple of {model_ranks} ranks or "
                          "lower the degrees")
    return ParallelLayout(tensor=tensor, sequence=sequence, data=world_size // model_ranks)


def layout_from_config(parallel, world_size: int) -> ParallelLayout:
    """resolve_layout for a recipe's ParallelConfig: `parallel.layouts[world_size]`, where given, wins."""
    chosen = (getattr(parallel, "layouts", None) or {}).get(world_size, parallel)
    return resolve_layout(chosen.tensor_parallel, chosen.sequence_parallel, world_size)


def check_seq_len(sequence: int, seq_len: int, names: DegreeNames = RECIPE_NAMES) -> None:
    """Ulysses gives each SP rank an equal contiguous slice of the sequence."""
    if seq_len % sequence:
        raise ConfigError(f"{names.sequence}={sequence} does not divide the sequence length {seq_len}; make the "
                          f"sequence length (data.seq_len of a recipe) a multiple of {sequence}")


def check_layout(layout: ParallelLayout, shape: ModelShape, seq_len: int | None = None,
                 names: DegreeNames = RECIPE_NAMES, vocab_parallel: bool = False) -> None:
    """A one-line ConfigError, before anything is allocated, where `shape` does not split by `layout`.

    TP (megatron-core) splits whole query heads and whole kv heads (never replicating kv heads), the hidden and MLP
    widths, and with `vocab_parallel` (reshard's TP files) the vocabulary; Ulysses SP then splits each TP rank's
    query heads and splits or replicates its kv heads, and the sequence.
    """
    tp, sp = _check_degree(names.tensor, layout.tensor), _check_degree(names.sequence, layout.sequence)
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    if heads % tp:
        raise ConfigError(f"{names.tensor}={tp} does not divide the model's num_heads={heads} (attention heads); "
                          f"use a divisor of {heads}")
    if tp > kv_heads:
        raise ConfigError(f"{names.tensor}={tp} exceeds the model's num_kv_heads={kv_heads} (replicating kv heads "
                          f"over TP ranks is not supported); use {names.tensor} <= {kv_heads} and add "
                          f"{names.sequence} or data ranks instead")
    if kv_heads % tp:
        raise ConfigError(f"{names.tensor}={tp} does not divide the model's num_kv_heads={kv_heads} (kv heads); "
                          f"use a divisor of {kv_heads}")
    sizes = ["hidden_size", "intermediate_size"] + (["vocab_size"] if vocab_parallel else [])
    for name in sizes:
        if getattr(shape, name) % tp:
            raise ConfigError(f"{names.tensor}={tp} does not divide the model's {name}={getattr(shape, name)}; "
                              "use a divisor of it")
    heads_tp, kv_tp = heads // tp, kv_heads // tp
    if heads_tp % sp:
        raise ConfigError(f"{names.tensor}={tp} x {names.sequence}={sp} does not divide the model's num_heads={heads} "
                          f"({heads_tp} attention heads per TP rank); choose degrees whose product divides {heads}")
    if kv_tp % sp and sp % kv_tp:
        raise ConfigError(f"{names.sequence}={sp} and the model's {kv_tp} kv heads per TP rank (num_kv_heads="
                          f"{kv_heads} / {names.tensor}={tp}) must divide one another (Ulysses splits or replicates "
                          "kv heads)")
    if seq_len is not None:
        check_seq_len(sp, seq_len, names)


def check_gate_granularity(layout: ParallelLayout, granularity: str, names: DegreeNames = RECIPE_NAMES) -> None:
    """Per-head gates mix whole query heads, and TP gives each rank a slice of them: per-layer gates only under TP."""
    if granularity == "head" and layout.tensor > 1:
        raise ConfigError(f"morph.gate_granularity=head cannot run with {names.tensor}={layout.tensor} (each TP rank "
                          f"holds a slice of the heads); use morph.gate_granularity=layer or {names.tensor}=1")
