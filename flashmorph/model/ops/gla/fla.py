"""fla's GLA kernels on CUDA with the naive contract: `chunk_gla` (prefill, training) and `fused_recurrent_gla`
(decode). The only module that imports fla, and only on first use: fla pulls in Triton and warns at import on CPU."""

import functools
import logging

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def chunk_gla_kernel():
    """fla's chunk_gla, or None where fla does not import."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception as err:  # fla pulls in triton; any failure just means "no fla"
        logger.warning("fla is unavailable (%s); linear attention uses the naive torch path", err)
        return None
    return chunk_gla


@functools.lru_cache(maxsize=1)
def fused_recurrent_gla_kernel():
    """fla's fused_recurrent_gla (the decode kernel), or None where fla does not import."""
    try:
        from fla.ops.gla import fused_recurrent_gla
    except Exception as err:  # same as chunk_gla_kernel: any failure means "no fla"
        logger.warning("fla is unavailable (%s); linear-attention decoding uses the naive torch step", err)
        return None
    return fused_recurrent_gla


def fla_chunk_gla(q, k, v, log_decay, scale=1.0, initial_state=None, output_final_state=False):
    """`gla_recurrent_reference`'s contract on fla's chunk_gla: CUDA tensors, and fla imports (`chunk_gla_kernel`)."""
    if initial_state is not None:
        initial_state = initial_state.float()  # chunk_gla asserts an fp32 initial state
    return chunk_gla_kernel()(
        q,
        k,
        v,
        g=log_decay,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )


def fla_gla_step(q_t, k_t, v_t, log_decay_t, state, scale=1.0):
    """`gla_step`'s contract on fla's fused_recurrent_gla: CUDA tensors, and fla imports (`fused_recurrent_gla_kernel`).

    fla returns the state in the kernel's dtype; the generation cache keeps it fp32."""
    o, new_state = fused_recurrent_gla_kernel()(
        q_t,
        k_t,
        v_t,
        gk=log_decay_t,
        scale=scale,
        initial_state=None if state is None else state.float(),
        output_final_state=True,
    )
    return o, new_state.float()
