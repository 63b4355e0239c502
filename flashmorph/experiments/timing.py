"""Selection cost in seconds: wall time with the GPU drained before and after (so queued kernels are counted), plus
the process CPU time (the meaningful figure on a CPU run)."""

import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device):
    """`with timed(device) as t: ...` then t["seconds"] (wall, CUDA synchronized) and t["cpu_seconds"]."""
    result: dict = {}
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        synchronize(device)
        result["seconds"] = time.perf_counter() - wall
        result["cpu_seconds"] = time.process_time() - cpu
