"""Run a function on N local CPU processes joined by gloo (DeepSpeed's CPU accelerator), from a plain `python` tool.

Used where the work needs a world of a given size but no accelerator, e.g. writing a ZeRO-3 checkpoint of DP size N.
"""

import contextlib
import logging
import os
import pickle
import queue as queue_lib
import socket
import traceback

import torch.multiprocessing as mp

from flashmorph.errors import FlashMorphError

log = logging.getLogger(__name__)
_POLL_S = 2.0

# DS_ACCELERATOR=cpu makes DeepSpeed pick gloo even on a GPU host; hiding CUDA keeps init_distributed on the CPU
_CPU_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environ(extra: dict[str, str]):
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker(rank: int, world_size: int, port: int, threads: int, fn, args, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(threads)
    from flashmorph.parallel.distributed import distributed_session

    try:
        with distributed_session() as info:
            value = fn(info, *args)
        results.put((rank, "ok", pickle.dumps(value)))
    except FlashMorphError as err:
        results.put((rank, "user", str(err)))
    except BaseException:  # report every failure to the parent instead of leaving it waiting
        results.put((rank, "crash", traceback.format_exc()))


def spawn_local(fn, world_size: int, *args, timeout: float | None = None) -> list:
    """fn(info, *args) on `world_size` fresh CPU processes; returns their results in rank order.

    `fn` must be importable (a module-level function). A FlashMorphError on any rank is raised here with its
    one-line message; any other failure (its traceback goes to the log) or a dead rank raises FlashMorphError.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    with _environ(_CPU_ENV):
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads, fn, args, results))
                 for r in range(world_size)]
        for proc in procs:
            proc.start()
    collected = {}
    waited = 0.0
    try:
        while len(collected) < world_size:
            try:
                rank, status, payload = results.get(timeout=_POLL_S)
            except queue_lib.Empty:
                waited += _POLL_S
                dead = [r for r, proc in enumerate(procs) if r not in collected and proc.exitcode not in (None, 0)]
                if dead:
                    code = procs[dead[0]].exitcode
                    why = "killed, out of memory?" if code == -9 else "see its output above"
                    raise FlashMorphError(f"worker rank {dead[0]} of {world_size} died with exit code {code} "
                                          f"before reporting ({why})") from None
                if timeout is not None and waited >= timeout:
                    raise FlashMorphError(f"no answer from {world_size} worker processes within {timeout:.0f} s; "
                                          "a rank hung") from None
                continue
            if status == "user":
                raise FlashMorphError(payload)
            if status == "crash":
                log.error("rank %d failed:\n%s", rank, payload)
                raise FlashMorphError(f"worker rank {rank} of {world_size} failed: {payload.strip().splitlines()[-1]}")
            collected[rank] = pickle.loads(payload)
    finally:
        for proc in procs:
            if len(collected) < world_size and proc.is_alive():
                proc.kill()
            proc.join()
    return [collected[r] for r in range(world_size)]
