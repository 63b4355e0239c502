"""Multi-GPU verification (issue 8), one launch per step under torchrun (bench/multi_gpu.sh runs them in order):

  nccl  all_reduce and all_to_all give the exact expected values on every rank; bus bandwidth of a --nccl-mib
        all_reduce and all_to_all (busbw = algbw x 2(n-1)/n and x (n-1)/n, nccl-tests' convention).
  gate  a gate-search step as flashmorph/stages/gate_search.py runs it: the --gate-shape model built under
        zero.Init (zero.zero3_model_init), MorphableLM, activation checkpointing, ZeRO-3 over every rank, gate-only
        AdamW, answer-token CE + lambda x mean gate; each rank reads its own MQAR sample (batch 1 per rank).
        At the first step, the gate-logit gradient ZeRO-3 reduced is checked against the one-process gradient on
        the same samples (each rank's own gradient, computed outside DeepSpeed, averaged). Per-GPU peak, step
        time, the gates after every step, whether every rank holds the same gates, and a single-GPU peak measured
        elsewhere (--single-gpu-gate-gib) beside ours.
  sp    a LoRA distill step as flashmorph/stages/distill.py composes it (mesh -> SP -> checkpointing -> LoRA ->
        engine with mpu): the --sp-shape hybrid (--budget of the layers full), Ulysses SP over every rank, ZeRO-3
        over the SP x DP group, tiled KL vs the same weights with adapters off. First the loss at
        --sp-compare-length with SP against the same engine with SP uninstalled (every rank then runs the whole
        sequence: same weights, same tokens, no sharding); then training steps at each --sp-lengths (--warmup
        untimed steps at the first length only: nothing in fla retunes for a new length).
  tp    a distill step with trainable "linear" under megatron TP over every rank (--tp-shape): before the swap
        every rank computes the unsplit (TP=1) model's loss and the gradient norm of the trainable set on the
        same tokens; after apply_tensor_parallel the engine's first step must give the same loss and norm.
        Then throughput.
Every run's per-GPU peak (torch.cuda.max_memory_allocated, weights included; max over ranks) is set beside
flashmorph.estimate's `allocated` for the same setup. Rank 0 writes <out>/multi_gpu_<n>_<step>.json after every row.

    torchrun --standalone --nproc_per_node 2 -m bench.multi_gpu --steps nccl,gate --out runs/multi_gpu
    torchrun --standalone --nproc_per_node 2 -m bench.multi_gpu --steps nccl,gate,sp,tp --smoke   # CPU, gloo
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import (GIB, ROOT, SHAPES, Ratio, Results, allocated, format_bytes, format_length, free_memory,
                          llama_config, parse_length, parse_lengths, ratio, read_peak, reset_peak, synchronize)
from bench.distill_step import dtype_name, random_tokens
from bench.hybrid_inference import layer_layouts
from bench.morph_steps import enable_activation_checkpointing
from flashmorph.config import DistillConfig, SearchConfig
from flashmorph.estimate import EstimateSetup, estimate, shape_from_hf_config

STEPS = ("nccl", "gate", "sp", "tp")
RESULT_NAMES = {"nccl": "multi_gpu_1_nccl", "gate": "multi_gpu_2_gate_search", "sp": "multi_gpu_3_sequence_parallel",
                "tp": "multi_gpu_4_tensor_parallel"}
TITLES = {"nccl": "Multi-GPU 1: collectives and bandwidth",
          "gate": "Multi-GPU 2: gate search under ZeRO-3 over all ranks",
          "sp": "Multi-GPU 3: LoRA distill step with Ulysses sequence parallelism",
          "tp": "Multi-GPU 4: distill step (trainable linear) with megatron tensor parallelism"}
SEARCH = SearchConfig()  # gate search's lr, regularizer and weight, as the stage uses them
DISTILL = DistillConfig()  # LoRA rank/alpha/targets, temperature, loss tiles, lr, as the stage uses them
# what a single-GPU gate-search run measured elsewhere (lead's run on one H200, batch 1, checkpointing): GiB by length
DEFAULT_SINGLE_GPU_GATE = "8K=19.64,32K=32.45"
BF16_TOLERANCE_NOTE = ("bf16 targets (<= 0.01 relative) are a first guess, not calibrated: Ulysses' shard shapes and "
                       "TP's bf16 all-reduce round differently from one process, and the KL is a small difference of "
                       "two models' logits, so its relative error can exceed bf16's ~0.4%; fp32 (CPU) must agree to "
                       "1e-4")
PID_DIR_ENV = "MULTI_GPU_PID_DIR"  # multi_gpu.sh kills the workers listed here that outlive a timed-out launch


# ------------------------------------------------------------------------------------------------ the world


class Deadline:
    """Seconds left of --time-limit-s (inf without one); read on rank 0, decisions broadcast by World.decide."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds if seconds > 0 else None

    def left(self) -> float:
        return math.inf if self.at is None else self.at - time.monotonic()


class World:
    """This rank's place and the few collectives the report needs (decisions come from rank 0)."""

    def __init__(self, info, dtype: torch.dtype, deadline: Deadline):
        self.rank, self.size, self.device, self.dtype = info.rank, info.world_size, info.device, dtype
        self.is_main = info.is_main
        self.info = info  # flashmorph.parallel.distributed.DistInfo, for the stages' step objects
        self.deadline = deadline  # the launch's soft time limit, shared by its steps

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def decide(self, value):
        """Rank 0's `value` on every rank, so all ranks take the same branch."""
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def sum(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        tensor = tensor.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(tensor, group=group)
        return tensor


class Report:
    """Rank 0's results file of one step (bench.common.Results); a no-op on the other ranks."""

    def __init__(self, step: str, args, world: World, argv: list[str]):
        self.results = None
        self.ratios: list[Ratio] = []
        self._keys: list[str | None] = []  # put()'s key of each line, None for ratio()'s
        if not world.is_main:
            return
        self.results = Results(RESULT_NAMES[step], TITLES[step], args, world.device, "bench.multi_gpu", argv)
        launcher = f"torchrun --standalone --nproc_per_node {world.size}" if world.size > 1 else "python"
        self.results.data["environment"]["command"] = f"{launcher} -m bench.multi_gpu {shlex.join(argv)}"
        self.results.data["world"] = {"size": world.size, "backend": dist.get_backend(),
                                      "dtype": dtype_name(world.dtype)}
        self.results.write()

    def set(self, key: str, value) -> None:
        if self.results is not None:
            self.results.data[key] = value
            self.results.write()

    def row(self, **row) -> None:
        if self.results is not None:
            self.results.add_row(**row)

    def ratio(self, r: Ratio) -> None:
        self.ratios.append(r)
        self._keys.append(None)
        if self.results is not None:
            self.results.set_ratios(self.ratios)

    def put(self, key: str, r: Ratio) -> None:
        """Add a table line, or replace the one added under `key` (a line refined as its steps finish)."""
        if key in self._keys:
            self.ratios[self._keys.index(key)] = r
            if self.results is not None:
                self.results.set_ratios(self.ratios)
        else:
            self.ratio(r)
            self._keys[-1] = key

    def finish(self, notes: list[str]) -> None:
        if self.results is not None:
            self.results.data.pop("in_progress", None)
            self.results.finish(self.ratios, notes)


def gib(value) -> str:
    return format_bytes(value)


def peak_ratio(label: str, peaks: list, est_bytes: float, extra: str = "") -> Ratio:
    """measured per-GPU peak (max over ranks) / the estimator's allocated bytes."""
    measured = max(peaks) if all(isinstance(p, int) for p in peaks) else None
    detail = (f"max over ranks {gib(measured)} (per rank {', '.join(gib(p) for p in peaks)}) / "
              f"estimate {gib(est_bytes)}" if measured is not None else
              f"peak is measured on CUDA only; estimate {gib(est_bytes)}")
    return Ratio(label, ratio(measured, est_bytes), "", detail + (f"; {extra}" if extra else ""))


def step_peaks(world: World) -> list:
    return world.gather(read_peak(world.device))


def timed(fn, world: World) -> float:
    """Seconds of fn() on this rank, the device synchronised on both ends."""
    synchronize(world.device)
    started = time.perf_counter()
    fn()
    synchronize(world.device)
    return time.perf_counter() - started


def build_model(shape: str, world: World, seed: int, zero_ds_config: dict | None = None):
    """A random-weight Llama of `shape` in the run's dtype: under zero.Init when `zero_ds_config` is given (each
    rank holds its partition only, as the stages load models), otherwise whole on this rank's device."""
    from transformers import AutoModelForCausalLM

    from flashmorph.parallel import zero

    torch.manual_seed(seed)  # the same weights on every rank (zero.Init also broadcasts rank 0's)
    if zero_ds_config is not None:
        with zero.zero3_model_init(zero_ds_config):
            return AutoModelForCausalLM.from_config(llama_config(shape), dtype=world.dtype, attn_implementation="sdpa")
    with torch.device(world.device):
        lm = AutoModelForCausalLM.from_config(llama_config(shape), dtype=world.dtype, attn_implementation="sdpa")
    return lm.to(world.device)


def distill_ds_config(world_size_dp: int, dtype: torch.dtype) -> dict:
    from flashmorph.parallel import zero

    return zero.build_ds_config(micro_batch_size=1, grad_accum_steps=1, world_size=world_size_dp,
                                dtype=dtype_name(dtype), zero_stage=3, lr=DISTILL.lr, weight_decay=DISTILL.weight_decay,
                                grad_clip=DISTILL.grad_clip)


def bench_distill_config(args, trainable: str) -> DistillConfig:
    """The stage's distill settings for one sequence per step, with this run's trainable set and loss tiles."""
    return dataclasses.replace(DISTILL, trainable=trainable, micro_batch_size=1, grad_accum_steps=1,
                               token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk)


class FixedTokens:
    """A dataset whose every sample is the same `input_ids` [1, T]: the stage's step reads the bench's tokens."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def batch(self, indices) -> dict:
        return {"input_ids": self.input_ids, "labels": self.input_ids}


def stage_step(step_fn, batches) -> None:
    """A stage's optimizer step on its micro batches, as the training loop runs it (without guard, logs, saves)."""
    for batch in batches:
        loss, _ = step_fn.micro_step(batch)
        step_fn.engine.backward(loss)
        step_fn.engine.step()


def distill_estimate(args, config, world: World, seq_len: int, trainable: str, full_layers: int, tp: int = 1,
                     sp: int = 1):
    """flashmorph.estimate for this run's distill setup (the stage's LoRA settings, loss tiles, ZeRO-3)."""
    setup = EstimateSetup(gpus=world.size, tensor_parallel=tp, sequence_parallel=sp, seq_len=seq_len,
                          dtype=dtype_name(world.dtype), trainable=trainable, lora_rank=DISTILL.lora_rank,
                          lora_modules=tuple(DISTILL.lora_targets),
                          lora_linear_layers_only=DISTILL.lora_linear_layers_only, full_layers=full_layers,
                          activation_checkpointing=True, zero_stage=3, loss_chunk=args.token_chunk,
                          vocab_chunk=args.vocab_chunk)
    return estimate(shape_from_hf_config(config.to_dict(), name=args.shape_name), setup)


# ------------------------------------------------------------------------------------------------ 1: collectives


def run_nccl(args, world: World, report: Report) -> list[str]:
    device, n = world.device, world.size
    report.set("devices", world.gather(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))
    if device.type == "cuda":
        report.set("nccl_version", ".".join(map(str, torch.cuda.nccl.version())))
    # all_reduce: rank r contributes r + 1 everywhere, so every element must be n (n + 1) / 2 exactly
    summed = torch.full((1024,), float(world.rank + 1), device=device)
    dist.all_reduce(summed)
    reduce_error = (summed - n * (n + 1) / 2).abs().max().item()
    # all_to_all: element j of rank r's chunk for rank d is 1000 r + 10 d + j; rank d must receive chunk d of each r
    chunk = 4
    send = torch.tensor([1000 * world.rank + 10 * d + j for d in range(n) for j in range(chunk)], dtype=torch.float32,
                        device=device)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send)
    expected = torch.tensor([1000 * r + 10 * world.rank + j for r in range(n) for j in range(chunk)],
                            dtype=torch.float32, device=device)
    a2a_error = (received - expected).abs().max().item()
    errors = world.gather((reduce_error, a2a_error))
    report.row(kind="correctness", all_reduce_max_error_per_rank=[e[0] for e in errors],
               all_to_all_max_error_per_rank=[e[1] for e in errors])
    report.ratio(Ratio("all_reduce: max abs error over ranks (sum of rank+1)", max(e[0] for e in errors), "<= 0",
                       f"{n} ranks, backend {dist.get_backend()}"))
    report.ratio(Ratio("all_to_all_single: max abs error over ranks", max(e[1] for e in errors), "<= 0",
                       f"{n} ranks, chunks of {chunk} elements"))

    nbytes = args.nccl_mib * 2**20
    tensor = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    out = torch.empty_like(tensor)
    for name, fn, factor in (("all_reduce", lambda: dist.all_reduce(tensor), 2 * (n - 1) / n),
                             ("all_to_all", lambda: dist.all_to_all_single(out, tensor), (n - 1) / n)):
        for _ in range(args.nccl_warmup):
            fn()
        seconds = sorted(world.gather([timed(fn, world) for _ in range(args.nccl_iters)])[0])
        median_s = seconds[len(seconds) // 2]
        algbw = nbytes / median_s / 1e9
        report.row(kind="bandwidth", op=name, bytes=nbytes, median_s=median_s, times_s=seconds, algbw_gb_s=algbw,
                   busbw_gb_s=algbw * factor)
        report.ratio(Ratio(f"{name} {args.nccl_mib} MiB fp32: bus bandwidth (GB/s)", algbw * factor, "",
                           f"median {median_s * 1e3:.2f} ms of {args.nccl_iters}; algbw {algbw:.1f} GB/s"))
    return [f"busbw = algbw x 2(n-1)/n for all_reduce, x (n-1)/n for all_to_all (nccl-tests' convention); "
            f"rank 0's times after {args.nccl_warmup} warm-up calls"]


# ------------------------------------------------------------------------------------------------ 2: gate search


def parse_reference(text: str) -> dict[int, float]:
    """'8K=19.64,32K=32.45' -> {8192: 19.64, 32768: 32.45} (GiB by length)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        length, _, value = part.partition("=")
        try:
            out[parse_length(length)] = float(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{part!r}: write LENGTH=GIB, e.g. 8K=19.64") from None
    return out


def run_gate(args, world: World, report: Report) -> list[str]:
    from flashmorph.config import ParallelConfig
    from flashmorph.model.config import MorphConfig
    from flashmorph.parallel.layout import resolve_layout
    from flashmorph.parallel.mesh import destroy_mesh, init_mesh
    from flashmorph.stages.gate_search import build_gate_engine, gate_search_ds_config

    started = time.perf_counter()
    # the stage's config and engine: one sample per rank per step, ZeRO-3 over every rank, gate-only AdamW
    search = dataclasses.replace(SEARCH, micro_batch_size=1, grad_accum_steps=1)
    ds_config = gate_search_ds_config(search, ParallelConfig(zero_stage=3), dtype_name(world.dtype), world.size)
    lm = build_model(args.gate_shape, world, args.seed, zero_ds_config=ds_config)
    enable_activation_checkpointing(lm)
    mesh = init_mesh(resolve_layout(1, 1, world.size))  # data parallel only: every rank a DP replica
    try:
        return _run_gate(args, world, report, search, lm, mesh, started,
                         build_gate_engine(lm, MorphConfig(), ds_config, args.seed, mesh, search.micro_batch_size))
    finally:
        destroy_mesh()


def _run_gate(args, world: World, report: Report, search, lm, mesh, started, built) -> list[str]:
    from flashmorph.config import num_full_layers
    from flashmorph.data import DataConfig, RetrievalDataset, TokenSpace
    from flashmorph.parallel import zero
    from flashmorph.stages.gate_search import GateSearchStep, gate_search_loss

    device, deadline = world.device, world.deadline
    model, engine = built
    build_s = time.perf_counter() - started
    persistent = world.gather(allocated(device))
    report.row(kind="build", build_s=build_s, allocated_after_build_bytes_per_rank=persistent)
    config = lm.config
    layers = config.num_hidden_layers
    budget_fraction = num_full_layers(SEARCH.budget, layers) / layers
    shape = shape_from_hf_config(config.to_dict(), name=args.gate_shape)
    references = args.single_gpu_gate_gib if not args.smoke else {}
    history = []
    for length in args.gate_lengths:
        if not world.decide(deadline.left() > 0):
            report.row(kind="skipped", length=length, reason="the time limit was reached")
            continue
        report.set("in_progress", f"gate search at {format_length(length)}")
        data = DataConfig(tasks={"mqar": 1.0}, seq_len=length, num_pairs=8 if length < 512 else 64, seed=args.seed)
        dataset = RetrievalDataset(data, TokenSpace.synthetic(config.vocab_size), split="bench")
        step_fn = GateSearchStep(engine, model, dataset, search, world.info, budget_fraction, mesh)
        times, gates, ces, answer_tokens, grad_checks = [], [], [], 0, []
        for step in range(args.warmup + args.gate_steps):
            if step > args.warmup and not world.decide(deadline.left() > 2 * max(times[-1:] or [0.0])):
                break  # keep what was measured: another step would pass the time limit
            (batch,) = step_fn.micro_batches(step)  # the stage's samples and answer-token scale for this rank
            answer_tokens = int((batch["shift_labels"] != -100).sum())

            def loss_of(out):  # the stage's loss on this rank
                return gate_search_loss(out, step_fn.ce_scale, step_fn.lam, search, budget_fraction)[0]

            if step == 0:  # what one process would compute on the step's samples: see single_process_gate_grad
                grad_single = single_process_gate_grad(model, batch, loss_of, world)

            def gate_step():
                loss, _ = step_fn.micro_step(batch)
                engine.backward(loss)
                if step == 0:
                    grad_checks.append(gate_grad_check(model, grad_single, world))
                engine.step()
                done = step_fn.finish(step)
                ces.append(done.scalars["loss/retrieval"])
                gates.append([round(v, 6) for v in done.gates.reshape(-1).tolist()])

            if step == args.warmup:
                reset_peak(device)
            times.append(max(world.gather(timed(gate_step, world))))
        peaks = step_peaks(world)
        timed_s = times[args.warmup:]
        step_s = sorted(timed_s)[len(timed_s) // 2] if timed_s else None
        ests = {g: estimate(shape, EstimateSetup(gpus=g, seq_len=length, dtype=dtype_name(world.dtype),
                                                 trainable="gates", full_layers="mixed",
                                                 activation_checkpointing=True, zero_stage=3,
                                                 loss_tokens=max(answer_tokens, 1)))
                for g in sorted({1, world.size})}
        history.append({"length": length, "gate_values_per_step": gates})
        if grad_checks:
            check = grad_checks[0]
            report.row(kind="gate_grad_check", length=length, **check)
            tol = "<= 1e-5" if world.dtype == torch.float32 else "<= 0.02"
            report.ratio(Ratio(f"gate search @{format_length(length)}, first step: gate-logit gradient, ZeRO-3 "
                               f"x{world.size} vs one process on the same {world.size} samples: "
                               "max abs diff / max abs g", check["relative_max_difference"], tol,
                               f"max abs g {check['max_abs_single']:.4g}, "
                               f"max abs diff {check['max_abs_difference']:.3g}; "
                               "the one-process gradient is the mean of per-rank gradients computed without "
                               "DeepSpeed (gate values fed as an input)"))
        report.row(kind="gate_search", length=length, steps=len(times), warmup=args.warmup, step_times_s=times,
                   step_s=step_s, tokens_per_s=length * world.size / step_s if step_s else None,
                   peak_bytes_per_rank=peaks, answer_tokens_per_rank=answer_tokens, ce_per_step=ces,
                   gate_values_per_step=gates,
                   estimate_allocated_bytes={g: e.allocated for g, e in ests.items()},
                   estimate={g: e.to_dict() for g, e in ests.items()})
        tag = f"@{format_length(length)}"
        report.ratio(peak_ratio(f"gate search {tag}, ZeRO-3 x{world.size}: per-GPU peak / estimate({world.size} GPUs)",
                                peaks, ests[world.size].allocated,
                                f"estimate for 1 GPU {gib(ests[1].allocated)}" if 1 in ests and world.size > 1 else ""))
        single = references.get(length)
        if single is not None:
            measured = max(peaks) if all(isinstance(p, int) for p in peaks) else None
            weights = ests[1].weights
            expected = single * GIB - weights * (1 - 1 / world.size)
            report.ratio(Ratio(f"gate search {tag}: per-GPU peak x{world.size} / reported single-GPU peak",
                               ratio(measured, single * GIB), "",
                               f"{gib(measured)} / {single:.2f} GiB (reported, not measured here); that peak minus "
                               f"the {1 - 1 / world.size:.2f} of the weights ZeRO-3 leaves to the other ranks = "
                               f"{gib(expected)}"))
        report.ratio(Ratio(f"gate search {tag}, ZeRO-3 x{world.size}: step time (s)", step_s, "",
                           f"median of {len(timed_s)} after {args.warmup} warm-up; {world.size} samples of "
                           f"{format_length(length)} per step; gates after the last step: "
                           f"{' '.join(f'{v:.3f}' for v in gates[-1]) if gates else 'n/a'}"))
    final = zero.full_state(model.gates)["gate_logits"].reshape(-1)  # gathered from the ZeRO-3 partitions
    every = world.gather(final.tolist())
    spread = max(abs(a - b) for values in every for a, b in zip(values, every[0]))
    report.row(kind="gates", gate_logits_per_rank=every, max_abs_difference=spread)
    steps_run = sum(len(h["gate_values_per_step"]) for h in history)
    report.ratio(Ratio(f"gate logits after {steps_run} steps: max abs(rank r - rank 0)", spread, "<= 0",
                       f"{len(every[0])} gates on {world.size} ranks (ZeRO-3 keeps one partitioned tensor, so equal "
                       "by construction; the gradient check is the real test)"))
    engine.destroy()
    return [f"shape {args.gate_shape}, {dtype_name(world.dtype)}, built under zero.Init; MorphableLM (every layer "
            "mixed, gates at 0.88), activation checkpointing, ZeRO-3 over all ranks, gate-only AdamW lr "
            f"{SEARCH.lr}; loss = answer-token CE + {SEARCH.reg_weight} x mean gate; MQAR, 1 sample per rank",
            "the single-GPU peaks are the lead's measurement on one H200 (passed with --single-gpu-gate-gib), not this "
            "run's; ZeRO-3 over N ranks should save (1 - 1/N) of the weights and add its gather buffers",
            "peaks: torch.cuda.max_memory_allocated over the timed steps, weights included"]


def single_process_gate_grad(model, batch: dict, loss_of, world: World) -> torch.Tensor:
    """The gradient of the stage's loss w.r.t. the gate logits that one process would get on every rank's sample:
    each rank differentiates its own loss outside DeepSpeed (the gates enter as an input, `gate_values`, so ZeRO's
    gradient hooks never fire), and the per-rank gradients are averaged as data parallelism must average them."""
    from flashmorph.parallel import zero

    param = model.gates.gate_logits
    with zero.gathered([param]):
        logits = param.detach().clone().requires_grad_(True)
    out = model(batch["input_ids"], position_ids=batch["position_ids"], shift_labels=batch["shift_labels"],
                gate_values=torch.sigmoid(logits.float()))
    (grad,) = torch.autograd.grad(loss_of(out), logits)
    return world.sum(grad.float()) / world.size


def gate_grad_check(model, expected: torch.Tensor, world: World) -> dict:
    """ZeRO-3's reduced gate-logit gradient (after engine.backward, before step) against `expected`."""
    from deepspeed.utils import safe_get_full_grad

    got = safe_get_full_grad(model.gates.gate_logits).detach().to(expected.device, torch.float64)
    expected = expected.to(torch.float64)
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    return {"max_abs_difference": diff, "max_abs_single": scale,
            "relative_max_difference": diff / max(scale, 1e-30), "grad_zero3": got.cpu().tolist(),
            "grad_single_process": expected.cpu().tolist()}


# ------------------------------------------------------------------------------------------------ 3: sequence parallel


def run_sp(args, world: World, report: Report) -> list[str]:
    from flashmorph.data.length_schedule import LengthSchedule
    from flashmorph.model.config import MorphConfig
    from flashmorph.parallel import zero
    from flashmorph.parallel.layout import resolve_layout
    from flashmorph.parallel.mesh import destroy_mesh, init_mesh
    from flashmorph.parallel.sequence import install_sequence_parallel, shard_sequence, uninstall_sequence_parallel
    from flashmorph.stages.distill import DistillStep, prepare_distill_model

    device, deadline = world.device, world.deadline
    sp = world.size
    mesh = init_mesh(resolve_layout(1, sp, world.size))
    try:
        started = time.perf_counter()
        ds_config = distill_ds_config(mesh.dp_size, world.dtype)
        lm = build_model(args.sp_shape, world, args.seed, zero_ds_config=ds_config)  # TP = 1: zero.Init, as the stage
        layers = lm.config.num_hidden_layers
        modes = layer_layouts(layers, args.budget)["hybrid"]
        cfg = bench_distill_config(args, "lora")
        model, trainable = prepare_distill_model(lm, None, modes, cfg, MorphConfig(), mesh,
                                                 activation_checkpointing=True)
        engine = zero.initialize_engine(model, trainable, ds_config, mpu=mesh.mpu)
        engine.train()
        report.row(kind="build", build_s=time.perf_counter() - started, sp=sp, dp=mesh.dp_size,
                   full_layers=[i for i, m in enumerate(modes) if m == "full"],
                   lora_params=sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable),
                   allocated_after_build_bytes_per_rank=world.gather(allocated(device)))
        config = lm.config

        def shard_of(length: int, rank: int, size: int):
            input_ids, _ = random_tokens(config.vocab_size, length, device, args.seed)  # the same on every rank
            return shard_sequence(input_ids, input_ids, rank, size)

        def forward_kl(shard, group=None) -> float:
            """KL summed over the tokens of `group`'s shards (None: this rank's tokens only)."""
            with torch.no_grad():
                sums = engine(shard["input_ids"], shard["position_ids"], shard["shift_labels"])
            return world.sum(sums["kl_sum"], group).item() if group is not None else sums["kl_sum"].item()

        # the loss with SP against the same engine with SP uninstalled: every rank then holds the whole sequence
        length = args.sp_compare_length
        report.set("in_progress", f"SP loss comparison at {format_length(length)}")
        kl_sp = forward_kl(shard_of(length, mesh.sp_rank, sp), mesh.sp_group) / length
        uninstall_sequence_parallel(lm)
        whole = world.gather(forward_kl(shard_of(length, 0, 1)) / length)
        install_sequence_parallel(lm, mesh.sp_group, 1)
        kl_ref = whole[0]
        rel = abs(kl_sp - kl_ref) / max(abs(kl_ref), 1e-30)
        report.row(kind="loss_check", length=length, kl_per_token_sp=kl_sp, kl_per_token_whole_per_rank=whole,
                   relative_difference=rel)
        report.ratio(Ratio(f"SP={sp} loss @{format_length(length)}: abs(KL(SP) - KL(no SP)) / KL(no SP)", rel,
                           "<= 1e-4" if world.dtype == torch.float32 else "<= 0.01",
                           f"KL per token {kl_sp:.6g} (SP) vs {kl_ref:.6g} (no SP, every rank the whole sequence, "
                           f"same engine, weights and tokens; ranks agree: {len(set(whole)) == 1}); forward only, "
                           "before any optimizer step"))

        previous: tuple[int, float] | None = None
        for index, length in enumerate(args.sp_lengths):
            tag = f"SP={sp} distill @{format_length(length)}"
            # only the first length warms up: fla's GLA kernels do not specialise or autotune on the sequence length,
            # so after it a new length only grows the allocator's segments
            steps = (args.warmup if index == 0 else 0) + args.iters
            if previous is not None:  # between linear (MLP) and quadratic (attention) growth
                predicted = previous[1] * (length / previous[0]) ** 1.5
                while steps > 1 and steps * predicted > deadline.left():
                    steps -= 1
                if not world.decide(predicted < deadline.left()):
                    report.row(kind="skipped", length=length, predicted_step_s=predicted,
                               reason=f"a step (predicted {predicted:.0f} s) would pass the time limit")
                    report.put(f"{length}/speed", Ratio(f"{tag}: tokens/s", None, "",
                                                        f"not run: predicted {predicted:.0f} s per step, "
                                                        f"{deadline.left():.0f} s left"))
                    continue
            steps = world.decide(steps)
            warmup = min(args.warmup if index == 0 else 0, steps - 1)
            report.set("in_progress", f"SP distill steps at {format_length(length)}")
            # the stage's step: this rank's shard of the sequence, its loss scale, the KL summed over the SP group
            tokens = FixedTokens(random_tokens(config.vocab_size, length, device, args.seed)[0])
            step_fn = DistillStep(engine, {length: tokens}, LengthSchedule([(length, steps)]), cfg, mesh, world.info)
            est = distill_estimate(args, config, world, length, "lora", modes.count("full"), sp=sp)
            kls, done = [], []  # done: (seconds, per-rank peaks) of every step at this length

            for step in range(steps):
                batches = list(step_fn.micro_batches(step))

                def distill_step():
                    stage_step(step_fn, batches)
                    kls.append(step_fn.finish(step).scalars["loss/kl"])

                reset_peak(device)
                seconds = max(world.gather(timed(distill_step, world)))
                done.append((seconds, step_peaks(world)))
                report.row(kind="sp_step", length=length, step=step, warmup=step < warmup, seconds=seconds,
                           peak_bytes_per_rank=done[-1][1], kl_per_token=kls[-1])
                # the table lines so far, so a launch stopped at its time limit still shows this length
                measured = done[warmup:] or done
                step_s = sorted(s for s, _ in measured)[len(measured) // 2]
                peaks = [max(p[r] for _, p in measured) if all(isinstance(p[r], int) for _, p in measured) else None
                         for r in range(world.size)]
                which = (f"median of {len(measured)} after {warmup} warm-up" if len(done) > warmup else
                         "the warm-up step only: no timed step yet")
                if index > 0:
                    which = f"median of {len(measured)}; no warm-up at this length, kernels tuned at the first"
                report.put(f"{length}/speed", Ratio(f"{tag}: tokens/s", length / step_s, "",
                                                    f"{step_s:.3f} s per step ({which}), one sequence of "
                                                    f"{format_length(length)} split over {sp} ranks"))
                report.put(f"{length}/peak", peak_ratio(f"{tag}: per-GPU peak / estimate", peaks, est.allocated))
            previous = (length, step_s)
            report.row(kind="sp_distill", length=length, warmup=warmup, step_times_s=[s for s, _ in done],
                       step_s=step_s, tokens_per_s=length / step_s, peak_bytes_per_rank=peaks, kl_per_step=kls,
                       estimate_allocated_bytes=est.allocated, estimate=est.to_dict())
        engine.destroy()
    finally:
        destroy_mesh()
    return [f"shape {args.sp_shape}, {dtype_name(world.dtype)}, built under zero.Init; hybrid keeps {args.budget:g} of "
            f"the layers full (evenly spaced from layer 0); LoRA rank {DISTILL.lora_rank} alpha {DISTILL.lora_alpha:g} "
            f"on {'/'.join(DISTILL.lora_targets)} of the linear layers; teacher = the same weights, adapters off, "
            f"every layer softmax; tiled KL {args.token_chunk} tokens x {args.vocab_chunk} vocab; checkpointing; "
            "ZeRO-3 over the SP x DP group; random tokens, batch 1",
            "loss check: the same engine before any optimizer step, SP installed vs uninstalled (each rank then "
            "computes the whole sequence; ZeRO-3 still gathers the weights over both ranks)", BF16_TOLERANCE_NOTE]


# ------------------------------------------------------------------------------------------------ 4: tensor parallel


def run_tp(args, world: World, report: Report) -> list[str]:
    from flashmorph.data.length_schedule import LengthSchedule
    from flashmorph.model.config import MorphConfig
    from flashmorph.parallel import zero
    from flashmorph.parallel.layout import resolve_layout
    from flashmorph.parallel.mesh import destroy_mesh, init_mesh
    from flashmorph.stages.distill import DistillStep, parallelize_distill_models, prepare_distill_model

    device, deadline = world.device, world.deadline
    tp = world.size
    mesh = init_mesh(resolve_layout(tp, 1, world.size))
    try:
        started = time.perf_counter()
        ds_config = distill_ds_config(mesh.dp_size, world.dtype)
        # TP slices whole weights, so its ranks build unpartitioned (as the stage loads them); the teacher is a
        # separate frozen copy of the same weights (trainable "linear" changes the student's own projections)
        student = build_model(args.tp_shape, world, args.seed)
        teacher = copy.deepcopy(student)
        layers = student.config.num_hidden_layers
        modes = layer_layouts(layers, args.budget)["hybrid"]
        cfg = bench_distill_config(args, "linear")
        # the stage's model without its parallel layers (mesh None): the TP=1 reference runs on it first
        model, trainable = prepare_distill_model(student, teacher, modes, cfg, MorphConfig(), None,
                                                 activation_checkpointing=True)
        model.train()
        config = student.config
        length = args.tp_length
        input_ids, position_ids = random_tokens(config.vocab_size, length, device, args.seed)  # same on every rank

        # TP = 1: the unsplit model on this rank, the same tokens, the same loss scale as the engine's first step
        report.set("in_progress", "TP=1 reference")
        sums = model(input_ids, position_ids, None)
        (sums["loss_sum"] / length).backward()
        ref_kl = sums["kl_sum"].item() / length
        ref_norm = math.sqrt(sum(p.grad.float().pow(2).sum().item() for p in trainable))
        for p in trainable:
            p.grad = None
        del sums
        free_memory(device)

        parallelize_distill_models([student, teacher], mesh, cfg.micro_batch_size)  # carries requires_grad over
        trainable = [p for p in student.parameters() if p.requires_grad]
        engine = zero.initialize_engine(model, trainable, ds_config, mpu=mesh.mpu)
        engine.train()
        free_memory(device)
        report.row(kind="build", build_s=time.perf_counter() - started, tp=tp, dp=mesh.dp_size,
                   trainable_params_per_rank=sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                 for p in trainable),
                   allocated_after_build_bytes_per_rank=world.gather(allocated(device)))
        kls, norms, times = [], [], []
        report.set("in_progress", "TP=2 steps")
        steps = 1 + args.warmup + args.iters
        step_fn = DistillStep(engine, {length: FixedTokens(input_ids)}, LengthSchedule([(length, steps)]), cfg, mesh,
                              world.info)
        for step in range(steps):
            if step > 1 + args.warmup and not world.decide(deadline.left() > 2 * times[-1]):
                break
            if step == 1 + args.warmup:
                reset_peak(device)
            batches = list(step_fn.micro_batches(step))

            def distill_step():
                stage_step(step_fn, batches)
                # TP ranks hold the same tokens: each rank's own KL sum is the whole one, checked per rank below
                kls.append(step_fn.totals[0].item() / length)
                norms.append(float(engine.get_global_grad_norm()))

            times.append(max(world.gather(timed(distill_step, world))))
        peaks = step_peaks(world)
        first = world.gather((kls[0], norms[0], ref_kl, ref_norm))
        kl_rel = max(abs(f[0] - f[2]) / max(abs(f[2]), 1e-30) for f in first)
        norm_rel = max(abs(f[1] - f[3]) / max(abs(f[3]), 1e-30) for f in first)
        timed_s = times[1 + args.warmup:]
        step_s = sorted(timed_s)[len(timed_s) // 2] if timed_s else None
        est = distill_estimate(args, config, world, length, "linear", modes.count("full"), tp=tp)
        report.row(kind="tp_distill", length=length, first_step_per_rank=[
            {"kl_tp": f[0], "grad_norm_tp": f[1], "kl_tp1": f[2], "grad_norm_tp1": f[3]} for f in first],
            kl_relative_difference=kl_rel, grad_norm_relative_difference=norm_rel, step_times_s=times, step_s=step_s,
            tokens_per_s=length / step_s if step_s else None, kl_per_step=kls, grad_norm_per_step=norms,
            peak_bytes_per_rank=peaks, estimate_allocated_bytes=est.allocated, estimate=est.to_dict())
        tol = "<= 1e-4" if world.dtype == torch.float32 else "<= 0.01"
        tag = f"TP={tp} distill @{format_length(length)}"
        report.ratio(Ratio(f"{tag}: abs(KL(TP={tp}) - KL(TP=1)) / KL(TP=1), first step", kl_rel, tol,
                           f"{kls[0]:.6g} vs {ref_kl:.6g} (rank 0); max over ranks"))
        report.ratio(Ratio(f"{tag}: abs(grad norm(TP={tp}) - grad norm(TP=1)) / grad norm(TP=1)", norm_rel, tol,
                           f"{norms[0]:.6g} (DeepSpeed, over TP slices) vs {ref_norm:.6g} (unsplit model); trainable "
                           "q/k/v/o of the linear layers"))
        report.ratio(Ratio(f"{tag}: tokens/s", length / step_s if step_s else None, "",
                           f"{step_s:.3f} s per step (median of {len(timed_s)} after {1 + args.warmup} untimed), "
                           f"{format_length(length)} tokens per step on {tp} ranks" if step_s else "no timed step"))
        report.ratio(peak_ratio(f"{tag}: per-GPU peak / estimate", peaks, est.allocated))
        engine.destroy()
    finally:
        destroy_mesh()
    return [f"shape {args.tp_shape}, {dtype_name(world.dtype)}; hybrid keeps {args.budget:g} of the layers full; "
            "trainable = q/k/v/o of the linear layers (megatron column/row-parallel); teacher = a separate frozen "
            f"copy, every layer softmax, also split; ZeRO-3 over the DP group (size {world.size // tp}); tiled KL "
            f"{args.token_chunk} x {args.vocab_chunk}; checkpointing; random tokens, batch 1",
            "TP=1 reference: every rank runs the unsplit student and teacher on the same tokens before the swap; "
            "its backward gives the gradient norm the engine's first step must reproduce (DeepSpeed's norm before "
            f"clipping at {DISTILL.grad_clip:g})",
            f"TP x DP needs {2 * tp}+ ranks; with {world.size} ranks only TP={tp} x DP=1 runs here",
            BF16_TOLERANCE_NOTE]


RUNNERS = {"nccl": run_nccl, "gate": run_gate, "sp": run_sp, "tp": run_tp}


# ------------------------------------------------------------------------------------------------ main


def parse_steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"unknown step {unknown[0] if unknown else text!r}; use some of "
                                         f"{','.join(STEPS)}")
    return steps


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=parse_steps, default=list(STEPS), help=f"some of {','.join(STEPS)}, in order")
    parser.add_argument("--out", default=str(ROOT / "runs" / "multi_gpu"), help="directory for the JSON files")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and lengths on CPU (gloo), seconds")
    parser.add_argument("--summary", action="store_true",
                        help="print the markdown of every multi_gpu_*.json in --out and exit (no processes started)")
    parser.add_argument("--time-limit-s", type=float, default=0.0,
                        help="soft limit of this launch: no step or length predicted to end after it starts (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing, per length")
    parser.add_argument("--iters", type=int, default=2, help="timed steps per length (sp, tp); the median is reported")
    parser.add_argument("--nccl-mib", type=int, default=256, help="message size of the bandwidth test")
    parser.add_argument("--nccl-warmup", type=int, default=3)
    parser.add_argument("--nccl-iters", type=int, default=10)
    parser.add_argument("--gate-shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--gate-lengths", type=parse_lengths, default=parse_lengths("8K"))
    parser.add_argument("--gate-steps", type=int, default=3, help="timed gate-search steps per length")
    parser.add_argument("--single-gpu-gate-gib", type=parse_reference, default=parse_reference(DEFAULT_SINGLE_GPU_GATE),
                        help="single-GPU gate-search peaks measured elsewhere, LENGTH=GiB,... (reported beside ours)")
    parser.add_argument("--sp-shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--sp-compare-length", type=parse_length, default=parse_length("8K"))
    parser.add_argument("--sp-lengths", type=parse_lengths, default=parse_lengths("32K,128K"))
    parser.add_argument("--tp-shape", default="llama3-1b", choices=sorted(SHAPES))
    parser.add_argument("--tp-length", type=parse_length, default=parse_length("8K"))
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of layers the hybrid keeps full")
    parser.add_argument("--token-chunk", type=int, default=DISTILL.token_chunk)
    parser.add_argument("--vocab-chunk", type=int, default=DISTILL.vocab_chunk)
    args = parser.parse_args(argv)
    if args.smoke:
        args.gate_shape = args.sp_shape = args.tp_shape = "tiny"
        args.gate_lengths, args.sp_compare_length, args.sp_lengths, args.tp_length = [128], 64, [64, 128], 64
        args.gate_steps, args.warmup, args.iters = 2, 1, 1
        args.nccl_mib, args.nccl_warmup, args.nccl_iters = 1, 1, 3
        args.token_chunk, args.vocab_chunk = 32, 128
    if args.time_limit_s < 0:
        parser.error("--time-limit-s must be >= 0")
    return args


def summarize(out_dir: str | Path) -> str:
    """Every step's table in run order, marked INCOMPLETE where a launch stopped early; missing steps named."""
    import json

    from bench.common import render

    texts = [f"# Multi-GPU verification ({out_dir})"]
    for step in STEPS:
        path = Path(out_dir) / f"{RESULT_NAMES[step]}.json"
        if not path.is_file():
            texts.append(f"## {TITLES[step]}\n\nnot run (no {path.name})")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            text = render(data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            text = f"## {path.name}\n\nunreadable ({type(err).__name__}: {err})"
        else:
            if data.get("in_progress"):
                text += f"\nstopped during: {data['in_progress']}"
        texts.append(text)
    return "\n\n".join(texts) + "\n"


def _record_pid() -> Path | None:
    """A file naming this worker, for multi_gpu.sh to kill if it outlives a timed-out torchrun."""
    directory = os.environ.get(PID_DIR_ENV)
    if not directory:
        return None
    path = Path(directory) / str(os.getpid())
    path.write_text("bench.multi_gpu\n")
    return path


def _stop_on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: the launch's time limit")  # unwinds through the finally blocks


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.summary:
        print(summarize(args.out), end="")
        return
    signal.signal(signal.SIGTERM, _stop_on_signal)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations in torch/transformers: 1000s of lines
    pid_file = _record_pid()
    from flashmorph.parallel import distributed

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("error: no CUDA device; run on a GPU node, or pass --smoke for the CPU run")
    deadline = Deadline(args.time_limit_s)  # counts the start-up too: the launch's limit is what binds
    info = distributed.init_distributed()
    try:
        dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
        world = World(info, dtype, deadline)
        for step in args.steps:
            args.shape_name = {"gate": args.gate_shape, "sp": args.sp_shape, "tp": args.tp_shape}.get(step)
            report = Report(step, args, world, argv)
            report.set("in_progress", "building the model and engine" if step != "nccl" else "collectives")
            started = time.perf_counter()
            if world.is_main:
                print(f"== {step} ({world.size} ranks)", flush=True)
            notes = RUNNERS[step](args, world, report)
            report.set("seconds", time.perf_counter() - started)
            report.finish(notes)
            free_memory(world.device)
    except BaseException:
        # a failed rank (out of memory, the launch's time limit) must not wait in destroy_process_group for peers
        # stuck in a collective: exit at once, so torchrun stops the others; every finished row is already on disk
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        os._exit(1)
    distributed.destroy_distributed()  # without it gloo ranks sometimes abort at exit
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
