"""Which samples a rank reads at each micro step: the same global stream whatever the number of ranks."""


def sample_indices(step: int, micro: int, dp_rank: int, dp_size: int, micro_batch: int, accum: int) -> range:
    """Step s covers samples [s*G, (s+1)*G) with G = micro_batch * accum * dp_size, so 1 process and N data-parallel
    ranks train on the same data (ranks of one TP/SP group read the same samples and split the work on them)."""
    global_batch = micro_batch * accum * dp_size
    start = step * global_batch + (micro * dp_size + dp_rank) * micro_batch
    return range(start, start + micro_batch)
