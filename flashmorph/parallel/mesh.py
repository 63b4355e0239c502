"""The process groups of a ParallelLayout (layout.py holds the layout and its checks against a model): megatron-core's
parallel_state groups and the `mpu` object DeepSpeed partitions and reduces over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.parallel.layout import ParallelLayout

if TYPE_CHECKING:  # torch.distributed is imported where groups are made, so recipe checks stay torch-free (fast)
    import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------
# Process groups


@dataclass(frozen=True)
class Mesh:
    """This rank's process groups. `sdp_group` (SP × DP) is what ZeRO partitions and reduces gradients over: ranks
    of one SP group hold the same weights and each computed part of the gradient of the same samples."""

    layout: ParallelLayout
    rank: int
    tp_group: dist.ProcessGroup
    sp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    sdp_group: dist.ProcessGroup
    tp_ranks: tuple[int, ...]
    sp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    sdp_ranks: tuple[int, ...]

    @property
    def tp_size(self) -> int:
        return self.layout.tensor

    @property
    def sp_size(self) -> int:
        return self.layout.sequence

    @property
    def dp_size(self) -> int:
        return self.layout.data

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def sp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def grad_divisor(self) -> int:
        """The number of ranks ZeRO-3 averages every gradient over: SP × DP (its reduce-scatter divides by the
        partition group's size). So scale each rank's loss such that one step's per-rank losses sum to this many
        times the step's loss; e.g. a rank's summed token loss × grad_divisor / the step's token count."""
        return self.sp_size * self.dp_size

    @property
    def mpu(self) -> MeshMPU:
        """The object to pass as `deepspeed.initialize(mpu=...)`."""
        return MeshMPU(self)


class MeshMPU:
    """The Megatron-style `mpu` interface DeepSpeed reads (engine, ZeRO-3 partitioning, gradient reduction, norms).

    DeepSpeed takes `get_data_parallel_*` as the batch-splitting group (train_batch_size = micro × accum × DP),
    `get_sequence_data_parallel_*` as the group ZeRO-3 shards parameters over (once `place_zero_partitions` pins
    it) and averages gradients in (see `Mesh.grad_divisor`), and `get_model_parallel_*` as the group whose ranks
    hold different slices, so grad norms sum over it. It must not define `initialize_sequence_parallel`: DeepSpeed
    reads that as its own SP-only mpu and then ignores the model-parallel group.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    # tensor / model parallel (no pipeline parallelism: model parallel = tensor parallel)
    def get_tensor_model_parallel_group(self):
        return self.mesh.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.mesh.tp_size

    def get_tensor_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.mesh.tp_ranks[0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    # data parallel: ranks that read different samples
    def get_data_parallel_group(self):
        return self.mesh.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.mesh.dp_ranks)

    # sequence parallel (Ulysses)
    def get_sequence_parallel_group(self):
        return self.mesh.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.mesh.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.mesh.sp_rank

    # sequence × data parallel: ZeRO's partition and gradient-reduction group
    def get_sequence_data_parallel_group(self):
        return self.mesh.sdp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.mesh.sp_size * self.mesh.dp_size

    def get_sequence_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(group=self.mesh.sdp_group)


def place_zero_partitions(model, partition_group) -> None:
    """Make ZeRO-3 shard every parameter of `model` over `partition_group` (the mesh's SP × DP group) when
    `deepspeed.initialize` converts it; call before initialize, on a model built without zero.Init.

    DeepSpeed 0.19.8 partitions such a model over `mpu.get_data_parallel_group()` (DP only: under TP=2 x SP=2 each
    weight landed in a group of one rank) but reduces each gradient over its parameter's partition group, so the SP
    ranks' partial gradients would never meet. It honours this per-parameter attribute (its AutoTP path sets it).
    `zero.initialize_engine(..., mpu=mesh.mpu)` calls this.
    """
    for param in model.parameters():
        if not hasattr(param, "ds_id"):  # already partitioned (zero.Init): its group is fixed
            param.ds_zero_partition_process_group = partition_group


_MESH: Mesh | None = None


def init_mesh(layout: ParallelLayout) -> Mesh:
    """Create the TP, SP, DP and SP×DP groups of the current world (collective: every rank calls it).

    megatron-core's `initialize_model_parallel` makes them (its context-parallel group serves as the Ulysses SP
    group; it creates its groups on the default backend, gloo on CPU); the groups are checked against the rank
    order `ParallelLayout` documents. One mesh at a time: `destroy_mesh()` first to make another.
    """
    global _MESH
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise FlashMorphError("init_mesh needs a process group; call "
                              "flashmorph.parallel.distributed.init_distributed first")
    world_size = dist.get_world_size()
    if layout.world_size != world_size:
        raise ConfigError(f"the layout {layout} covers {layout.world_size} ranks but the world has {world_size}; "
                          "build it with resolve_layout(tensor, sequence, world_size)")
    if _MESH is not None or parallel_state.model_parallel_is_initialized():
        raise FlashMorphError("a parallel mesh already exists in this process; call destroy_mesh() first")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        context_parallel_size=layout.sequence,
        create_gloo_process_groups=False,  # the default backend is gloo on CPU already; NCCL-only setups need none
    )
    rank = dist.get_rank()
    groups = {
        "tp": parallel_state.get_tensor_model_parallel_group(),
        "sp": parallel_state.get_context_parallel_group(),
        "dp": parallel_state.get_data_parallel_group(),
        "sdp": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    expected = layout.group_ranks(rank)
    ranks = {}
    for name, group in groups.items():
        ranks[name] = tuple(dist.get_process_group_ranks(group))  # in group-rank order
        got = sorted(ranks[name]) if name == "sdp" else list(ranks[name])  # a group rank must equal our coordinate
        if got != expected[name]:
            parallel_state.destroy_model_parallel()
            raise FlashMorphError(f"megatron-core built the {name} group {list(ranks[name])} on rank {rank}, expected "
                                  f"{expected[name]} (TP innermost, then SP, then DP); its rank order changed")
    _MESH = Mesh(layout, rank, groups["tp"], groups["sp"], groups["dp"], groups["sdp"],
                 ranks["tp"], ranks["sp"], ranks["dp"], ranks["sdp"])
    return _MESH


def current_mesh() -> Mesh | None:
    """The mesh `init_mesh` made in this process, or None."""
    return _MESH


def destroy_mesh() -> None:
    """Forget the mesh and megatron-core's parallel state (the groups end with the world's destroy_process_group)."""
    global _MESH
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _MESH = None
