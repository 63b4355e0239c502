"""Process-group setup and the few collectives stages need; the only place that talks to ranks."""

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ONE_PROCESS_ENV: dict[str, str | None] = {}  # variables a world of one set, with their values before (None: unset)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group the launcher set up (deepspeed, torchrun, srun), or make a 1-process one.

    A plain `python launcher/x.py` gets a world of one, so the DeepSpeed engine and every code path
    are the same as under `deepspeed --num_gpus N`.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from flashmorph.parallel.quiet import drop_stdout_lines

    if "RANK" not in os.environ:
        one_process = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        one_process.update((key, os.environ.get(key, default)) for key, default in
                           (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))))
        _ONE_PROCESS_ENV.clear()
        _ONE_PROCESS_ENV.update((key, os.environ.get(key)) for key in one_process)
        os.environ.update(one_process)
    if not dist.is_initialized():
        with drop_stdout_lines():  # DeepSpeed prints a line each time it loads its CPU comm op
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_distributed() -> None:
    """Tear the group down; without it gloo processes sometimes abort at exit. A world of one also gives back the
    environment it set: a later launcher started from this process (a test, a notebook) would otherwise inherit
    RANK and a MASTER_PORT that is no longer free."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, before in _ONE_PROCESS_ENV.items():
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    _ONE_PROCESS_ENV.clear()


@contextmanager
def distributed_session():
    """`with distributed_session() as info:` — init, then always destroy, even on errors."""
    try:
        yield init_distributed()
    finally:
        destroy_distributed()


def in_world() -> bool:
    """True inside a process group, or when a launcher (deepspeed, torchrun, srun) started several ranks."""
    return dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def joined_world():
    """The current process group's DistInfo; a group this call had to create is destroyed on exit."""
    if dist.is_initialized():
        yield init_distributed()
    else:
        with distributed_session() as info:
            yield info


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, in place and returned; a no-op in a world of one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def run_on_main(fn, info: DistInfo):
    """Run `fn()` on rank 0 only, then barrier. A FlashMorphError or a preemption there is raised on every rank (same
    type, same message), so a bad run directory, a failed teacher or a SIGTERM stops the whole job instead of leaving
    the other ranks at a barrier."""
    from flashmorph.errors import FlashMorphError, Preempted

    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except (FlashMorphError, Preempted) as err:
            error = err
    error = broadcast_object(error)
    if error is not None:
        raise error
    return result
