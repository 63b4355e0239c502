"""Run a test body in N gloo processes (the DeepSpeed CPU accelerator) and collect what rank 0 returns."""

import os
import pickle
import queue as queue_lib
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from flashmorph.parallel.distributed import distributed_session

    try:
        with distributed_session() as info:
            result = fn(info, *args)
        # plain pickle bytes: torch's queue would pass tensors as shared-memory fds that vanish when this rank exits
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    """fn(info, *args) runs on every rank; returns the list of per-rank results, in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    results = {}
    for _ in range(world_size):
        try:
            rank, status, payload = queue.get(timeout=timeout)
        except queue_lib.Empty:
            for proc in procs:
                proc.kill()
            raise AssertionError(f"no result from the ranks within {timeout:.0f} s (a rank hung or died)") from None
        if status != "ok":
            for proc in procs:
                proc.kill()
            raise AssertionError(f"rank {rank} failed:\n{payload}")
        results[rank] = pickle.loads(payload)
    for proc in procs:
        proc.join(timeout)
        if proc.exitcode != 0:
            raise AssertionError(f"a rank exited with code {proc.exitcode}")
    return [results[r] for r in range(world_size)]
