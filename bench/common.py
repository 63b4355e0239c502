"""Shared pieces of the GPU benchmarks: Llama-3 shapes built on the device with random weights, timing with CUDA
events after warm-up, peak memory, and one JSON results file per benchmark (device, date, versions, command).

Every benchmark runs as a module from the repository root (`python -m bench.attention_kernels --smoke`) and starts
from the same header: base_parser() for the arguments every benchmark takes, start() for smoke defaults, device and
results file."""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from flashmorph.estimate import PRESETS
from flashmorph.model.shape import ModelShape

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# Llama-3 shapes (weights are random: nothing is downloaded). "tiny" is the CPU smoke shape of every benchmark.
SHAPES = {
    "llama3-8b": PRESETS["llama3-8b"],
    "llama3-1b": ModelShape("llama3-1b", 16, 2048, 32, 8, 64, 8192, 128256, model_type="llama"),
    "tiny": ModelShape("tiny", 4, 64, 4, 2, 16, 128, 512, model_type="llama"),
}
ROPE_THETA = 500000.0  # Llama-3's
MAX_POSITIONS = 131072


# ------------------------------------------------------------------------------------------------ models


def llama_config(shape: str):
    """A transformers LlamaConfig of one of SHAPES."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise SystemExit(f"error: --shape {shape!r} is unknown; use one of {sorted(SHAPES)}")
    return LlamaConfig(**SHAPES[shape].hf_config_kwargs(),
                       rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                       max_position_embeddings=MAX_POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_lm(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight Llama causal LM created directly on `device` in `dtype` (no host copy), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype, attn_implementation="sdpa")
    if next(lm.parameters()).device.type != device.type:  # a transformers that ignores the device context
        lm.to(device)
    return lm.eval()


# ------------------------------------------------------------------------------------------------ device


def resolve_device(name: str, smoke: bool) -> tuple[torch.device, torch.dtype]:
    """(device, dtype): --device auto is CPU for --smoke and CUDA otherwise; bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        name = "cpu" if smoke else "cuda"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run on a GPU node, or pass --smoke for the CPU smoke run")
    device = torch.device(name)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 1, iters: int = 3) -> list[float]:
    """Seconds of each of `iters` timed calls of fn, after `warmup` untimed ones (fla autotunes and Triton compiles
    at the first call of a shape: ~100 s on an H100). CUDA events on CUDA, a host clock after a sync on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return times


def format_bytes(value) -> str:
    """1.50 GiB, 12.0 MiB, 4.0 KiB, 512 B; n/a for None (CPU peaks), other values (OOM) as they are."""
    if value is None:
        return "n/a"
    if not isinstance(value, (int, float)):
        return str(value)
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}" if unit == "GiB" else f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def measure_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """(fn()'s result, the peak bytes allocated on the device while it ran); the peak is None on CPU, where torch
    keeps no allocator statistics. The peak counts everything allocated, the weights included."""
    reset_peak(device)
    result = fn()
    return result, read_peak(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (after freeing what the caching allocator holds unused)."""
    if device.type == "cuda":
        free_memory(device)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> int | None:
    """Peak bytes allocated since the last reset_peak (None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def allocated(device: torch.device) -> int | None:
    """Bytes allocated on the device now (None on CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


OOM = "oom"  # what a measurement records when the device ran out of memory


def run_or_oom(fn: Callable[[], Any], device: torch.device) -> Any:
    """fn()'s result, or OOM when the device ran out of memory (freed again before returning)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as err:
        print(f"  out of memory: {str(err).splitlines()[0][:160]}", flush=True)
    # outside the except block, so the traceback (and the tensors its frames hold) is gone before freeing
    free_memory(device)
    return OOM


def largest_fitting_length(fits: Callable[[int], bool], start: int, limit: int, granularity: int = 1024) -> int | None:
    """The longest length in [start, limit] (a multiple of `granularity`) for which fits(length) is True, assuming
    that whatever fits at some length fits at every shorter one: doubling from `start`, then bisection. None if
    `start` itself does not fit. For P6 (max trainable context); fits() should catch OOM with run_or_oom."""
    if not fits(start):
        return None
    good, bad = start, None
    while bad is None:
        nxt = min(good * 2, limit)
        if nxt == good:
            return good
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
    return bisect_length(fits, good, bad, granularity)


def bisect_length(fits: Callable[[int], bool], good: int, bad: int, granularity: int) -> int:
    """The longest fitting multiple of `granularity` between `good` (fits) and `bad` (does not), by bisection."""
    while bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


# ------------------------------------------------------------------------------------------------ data


def retrieval_batch(vocab_size: int, seq_len: int, batch_size: int, device: torch.device, seed: int = 0,
                    split: str = "bench") -> dict[str, torch.Tensor]:
    """MQAR samples of exactly seq_len tokens with answer-only labels, as gate search trains on ({input_ids,
    labels}: [batch, seq_len]); vocabulary filler as the haystack."""
    from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace

    num_pairs = 8 if seq_len < 512 else 64
    dataset = RetrievalDataset(DataConfig(tasks={"mqar": 1.0}, seq_len=seq_len, num_pairs=num_pairs, seed=seed),
                               TokenSpace.synthetic(vocab_size), split=split)
    batch = dataset.batch(range(batch_size))
    return {key: value.to(device) for key, value in batch.items()}


# ------------------------------------------------------------------------------------------------ arguments


def parse_length(text: str) -> int:
    """'8K' -> 8192, '128k' -> 131072, '4096' -> 4096."""
    text = text.strip()
    try:
        if text[-1:].lower() == "k":
            return int(text[:-1]) * 1024
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length; write e.g. 8K or 8192") from None


def parse_lengths(text: str) -> list[int]:
    """'8K,32K' -> [8192, 32768]; '' -> []."""
    return [parse_length(part) for part in text.split(",") if part.strip()]


def format_length(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def base_parser(doc: str, default_shape: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes; --smoke switches to the tiny shape on CPU with tiny lengths."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="directory for the JSON results file")
    parser.add_argument("--smoke", action="store_true", help="seconds-long CPU run on the tiny shape (for CI)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--shape", default=default_shape, choices=sorted(SHAPES))
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing, per shape")
    parser.add_argument("--iters", type=int, default=3, help="timed calls; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def smoke_defaults(args: argparse.Namespace, **overrides) -> argparse.Namespace:
    """Under --smoke: the tiny shape, one warm-up, one timed call, and the given (tiny) overrides."""
    if args.smoke:
        args.shape, args.warmup, args.iters = "tiny", 1, 1
        for key, value in overrides.items():
            setattr(args, key, value)
    return args


class Run(NamedTuple):
    """What a benchmark's main() starts from: its arguments (smoke defaults applied), device, dtype, results file."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    results: Results


def start(parser: argparse.ArgumentParser, argv: Sequence[str] | None, name: str, title: str, **smoke) -> Run:
    """Parse argv, apply smoke_defaults(**smoke) under --smoke, resolve the device and open <out>/<name>.json for the
    module bench.<name>."""
    args = smoke_defaults(parser.parse_args(argv), **smoke)
    device, dtype = resolve_device(args.device, args.smoke)
    return Run(args, device, dtype, Results(name, title, args, device, f"bench.{name}", argv))


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Ratio:
    """One line of a benchmark's table."""

    name: str  # what is divided by what, and where: "P1 peak memory @8K: gate search / frozen fwd+bwd"
    value: float | None  # None when not measured (no allocator statistics on CPU, out of memory)
    target: str = ""  # "<= 1.10", ">= 2.0", or "" where no target applies
    detail: str = ""  # the absolute numbers behind the ratio

    def met(self) -> str:
        if not self.target or self.value is None:
            return "-"
        op, bound = self.target.split()
        ok = self.value <= float(bound) if op == "<=" else self.value >= float(bound)
        return "yes" if ok else "NO"


def ratio(numerator, denominator) -> float | None:
    """numerator / denominator, or None where either was not measured (None, OOM) or the denominator is 0."""
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)) or denominator == 0:
        return None
    return numerator / denominator


def format_table(title: str, ratios: Sequence[Ratio]) -> str:
    """A markdown table, one ratio per line, ready to paste into docs/benchmarks.md."""
    lines = [f"## {title}", "", "| measurement | ratio | target | met | detail |", "|---|---|---|---|---|"]
    for r in ratios:
        value = "n/a" if r.value is None else f"{r.value:.3f}"
        lines.append(f"| {r.name} | {value} | {r.target or '-'} | {r.met()} | {r.detail} |")
    return "\n".join(lines)


def environment(device: torch.device, module: str, argv: Sequence[str]) -> dict[str, Any]:
    """Device, date, the exact command (`python -m <module> ...`) and the software versions, recorded with every
    result."""
    from flashmorph.versions import collect_versions

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    versions = collect_versions()
    versions["torch_cuda"] = torch.version.cuda
    try:
        versions["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        versions["triton"] = "not installed"
    return {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", module, *argv]),
        "hostname": platform.node(),
        "versions": versions,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Results:
    """One benchmark's JSON file, `<out>/<name>.json`: environment, arguments, every measured row and the ratios.

    Rewritten after every change, so a run stopped by its time limit keeps what it had measured ("complete": false).
    """

    def __init__(self, name: str, title: str, args: argparse.Namespace, device: torch.device, module: str,
                 argv: Sequence[str] | None):
        self.path = Path(args.out) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        argv = list(sys.argv[1:] if argv is None else argv)
        self.data: dict[str, Any] = {"benchmark": name, "title": title,
                                     "environment": environment(device, module, argv), "args": vars(args),
                                     "rows": [], "ratios": [], "notes": [], "complete": False}
        self.write()

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def add_row(self, **row) -> None:
        self.data["rows"].append(row)
        self.write()
        print("  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)

    def set_ratios(self, ratios: Sequence[Ratio]) -> None:
        """The table so far; scripts call it after every row, so a stopped run still has its lines."""
        self.data["ratios"] = [asdict(r) | {"met": r.met()} for r in ratios]
        self.write()

    def finish(self, ratios: list[Ratio], notes: Sequence[str] = ()) -> list[Ratio]:
        """Record the ratios and notes, mark the file complete, print the table; return the ratios (what a
        benchmark's main() returns)."""
        self.data["notes"] = list(notes)
        self.data["complete"] = True
        self.set_ratios(ratios)
        print("\n" + render(self.data), flush=True)
        return ratios

    def write(self) -> None:
        from flashmorph.io.atomic import atomic_write_text

        atomic_write_text(self.path, json.dumps(_plain(self.data), indent=2) + "\n")


def render(data: dict) -> str:
    """A results file as its markdown table plus device, date, command and notes."""
    ratios = [Ratio(r["name"], r["value"], r["target"], r["detail"]) for r in data["ratios"]]
    title = data["title"] if data.get("complete") else f"{data['title']} (INCOMPLETE: the run stopped early)"
    env = data["environment"]
    lines = [format_table(title, ratios), "",
             f"device: {env['device']}; date: {env['date']}; torch {env['versions'].get('torch')}, "
             f"transformers {env['versions'].get('transformers')}, fla {env['versions'].get('fla')}",
             f"command: {env['command']}"]
    lines += [f"note: {note}" for note in data.get("notes", [])]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
