"""P5 (distillation step MFU, target >= 45 %), P6 (longest context one GPU trains, target >= 256K for the distill
step; also the gate-search step) and the estimator check of issue 5 (measured peak vs flashmorph.estimate).

The distill step is the stage's (flashmorph/stages/distill.py), built from a random-weight model instead of a model
directory: the --shape model in bf16 on the GPU, a hybrid keeping --budget of its layers full (evenly spaced from
layer 0) and the rest linear, LoRA (rank --lora-rank, alpha --lora-alpha) on q/k/v/o of the linear layers, teacher =
the same weights with adapters disabled and every layer softmax (DistillModel(student, None, ...)), activation
checkpointing, the tiled KL (--token-chunk x --vocab-chunk), one real DeepSpeed ZeRO-3 engine on one GPU
(zero.build_ds_config + zero.initialize_engine; torch AdamW). One step = engine forward (teacher, student, loss),
backward, optimizer step, on random tokens at batch 1.

  P5   median of --iters steps at --length after --warmup (the first step autotunes fla: ~100 s).
       MFU = model FLOPs / (step time x dense bf16 peak), with bench/flops.py's counts per token (T = length,
       N = weights a token meets, N_lora = LoRA parameters, A = attention's own FLOPs at T, causal):
         student (frozen base, LoRA trains)  4 N + 6 N_lora + 3 A_hybrid
         teacher (forward, all softmax)      2 N + A_full
       Recomputation is not model FLOPs. HFU adds what this step really recomputes: the student's decoder forward
       under checkpointing, 2 (N - N_head) + 2 N_lora + A_hybrid, and the tiled loss's second pass over both
       heads' logits in backward, 4 N_head (N_head = hidden x vocab).
  est  at each --estimate-lengths: torch.cuda.max_memory_allocated of one step (after a warm-up step; weights
       included) vs flashmorph.estimate's `allocated` for the same setup (1 GPU, ZeRO-3, trainable lora, the same
       rank, modules, full-layer count, token and vocab chunks); persistent (allocated before the step) and
       dynamic (peak - persistent) parts are recorded beside the estimator's components and per-token terms.
  P6   the longest length (a multiple of --p6-granularity, at most --p6-limit) at which one step finishes without
       running out of memory: a line through the measured peaks predicts the boundary, the predicted length and
       its neighbour are probed first, then doubling/bisection settles what they leave open. Every probe is one
       step (the engine is warm); a probe that runs out of memory is followed by a fresh engine, since ZeRO-3's
       state after an interrupted step is not to be trusted. Then the same for the gate-search step
       (bench/morph_steps.py: MorphableLM, every layer mixed, checkpointing, MQAR answer-token loss).
       With --time-budget-s, a probe whose predicted time (measured seconds per FLOP x its FLOPs, plus a rebuild)
       does not fit the remaining budget is not started: the result is then a lower bound, marked as such.

    python -m bench.distill_step --shape llama3-8b --length 8K --estimate-lengths 8K,16K,32K --out runs/bench
"""

from __future__ import annotations

import argparse
import time
import weakref
from dataclasses import dataclass

import torch

from bench.common import (GIB, OOM, Ratio, Results, allocated, base_parser, bisect_length, build_lm, format_bytes,
                          format_length, free_memory, largest_fitting_length, median, parse_length, parse_lengths,
                          ratio, read_peak, reset_peak, retrieval_batch, run_or_oom, start, synchronize, time_call)
from bench.flops import attention_flops_per_token, matmul_params, mfu, model_flops_per_token, peak_flops
from bench.hybrid_inference import layer_layouts
from bench.morph_steps import build_morphable, enable_activation_checkpointing, set_mode, train_step
from flashmorph.config import DistillConfig
from flashmorph.estimate import EstimateSetup, estimate, max_seq_len, shape_from_hf_config

TITLE = "P5/P6: distillation step MFU, longest trainable context, memory estimator check"
MFU_TARGET = ">= 0.45"
CONTEXT_TARGET_K = ">= 256"  # P6 distill, in K tokens
SECTIONS = ("p5", "estimate", "p6-distill", "p6-gate")
STAGE_DEFAULTS = DistillConfig()  # LoRA targets, alpha and loss tiles as the stage uses them
ALLOCATOR_RESERVE = 1.5 * GIB  # device memory the P6 line may not plan to use: CUDA context, workspaces, slack


# ------------------------------------------------------------------------------------------------ the distill step


@dataclass
class DistillEngine:
    engine: object  # the DeepSpeed engine over a DistillModel
    config: object  # the student's HF config
    modes: list[str]  # "full"/"linear" per layer
    lora_params: int  # N_lora: trainable parameters, counted before ZeRO partitions them
    build_s: float

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Forward (teacher, student, tiled KL), backward of the mean per-token KL, optimizer step."""
        sums = self.engine(input_ids, position_ids, None)
        self.engine.backward(sums["loss_sum"] / input_ids.numel())
        self.engine.step()

    def close(self) -> None:
        """Remove ZeRO's hooks and DeepSpeed's references to the model, so its weights can be freed."""
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

        module = self.engine.module
        self.engine.destroy()
        # Two process-wide references in DeepSpeed 0.19 would keep the old model's weights on the device beside a
        # rebuilt one: a module-level stack of ZeRO-3 modules (the root from engine creation, never popped, and
        # sub-modules whose forward a checkpoint recompute or an OOM cut short) and an lru_cache on a coordinator
        # method, keyed by the coordinator and sub-modules, filled once the parameter trace is complete (step 2 on).
        stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
        if stack is not None:
            mine = {id(m) for m in module.modules()}
            stack[:] = [m for m in stack if id(m) not in mine]
        cached = getattr(getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None),
                         "_PartitionedParameterCoordinator__params_to_release", None)
        for _ in range(3):  # under DeepSpeed's nvtx wrapper, which keeps the cached function in its closure
            if cached is None or hasattr(cached, "cache_clear"):
                break
            inner = [c.cell_contents for c in getattr(cached, "__closure__", None) or () if callable(c.cell_contents)]
            cached = getattr(cached, "__wrapped__", None) or (inner[0] if inner else None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        self.engine = None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_distill(args, device: torch.device, dtype: torch.dtype) -> DistillEngine:
    """The stage's student/teacher/engine (see the module docstring) from a random-weight model on `device`."""
    from flashmorph.model.config import MorphConfig
    from flashmorph.model.hybrid import apply_hybrid_layout
    from flashmorph.parallel import zero
    from flashmorph.training import lora
    from flashmorph.training.distill_model import DistillModel

    started = time.perf_counter()
    lm = build_lm(args.shape, device, dtype, args.seed)
    modes = layer_layouts(lm.config.num_hidden_layers, args.budget)["hybrid"]
    apply_hybrid_layout(lm, modes, MorphConfig())
    lm.requires_grad_(False)
    if args.checkpointing:
        enable_activation_checkpointing(lm)
    linear_layers = [i for i, mode in enumerate(modes) if mode == "linear"]
    student = lora.add_lora(lm, rank=args.lora_rank, alpha=args.lora_alpha, targets=STAGE_DEFAULTS.lora_targets,
                            layers=linear_layers)
    trainable = [p for p in student.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in trainable)
    model = DistillModel(student, None, temperature=1.0, ce_weight=0.0, token_chunk=args.token_chunk,
                         vocab_chunk=args.vocab_chunk)
    ds_config = zero.build_ds_config(micro_batch_size=1, grad_accum_steps=1, world_size=1, dtype=dtype_name(dtype),
                                     zero_stage=3, lr=1e-4, weight_decay=0.0, grad_clip=1.0)
    engine = zero.initialize_engine(model, trainable, ds_config)
    engine.train()
    if args.simulate_oom_above:
        simulate_oom(lm, args.simulate_oom_above, args.checkpointing)
    synchronize(device)
    return DistillEngine(engine, lm.config, modes, lora_params, time.perf_counter() - started)


def simulate_oom(lm, above: int, checkpointing: bool) -> None:
    """Testing aid (--simulate-oom-above): raise a CUDA out-of-memory error in the backward of every step longer
    than `above` tokens, where a real one strikes, so the CPU smoke run exercises the recovery path. With
    checkpointing the last layer's MLP runs twice with grad enabled per step (forward, recompute in backward; the
    MLP, not the layer, since transformers versions differ in whether the layer's own hooks are recomputed)."""
    calls = {"n": 0}
    per_step = 2 if checkpointing else 1

    def hook(module, args):
        if not torch.is_grad_enabled():  # the teacher's forward
            return
        calls["n"] += 1
        tokens = args[0].shape[1]  # [batch, seq, hidden]
        if tokens > above and calls["n"] % per_step == 0:
            raise torch.cuda.OutOfMemoryError(f"simulated: {tokens} tokens > --simulate-oom-above {above}")

    lm.get_decoder().layers[-1].mlp.register_forward_pre_hook(hook)


def random_tokens(vocab_size: int, length: int, device: torch.device, seed: int):
    """([1, length] input ids, [1, length] positions): the step's cost does not depend on the token values."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_size, (1, length), generator=generator).to(device)
    return input_ids, torch.arange(length, device=device)[None]


# ------------------------------------------------------------------------------------------------ FLOPs


def distill_flops_per_token(config, seq_len: int, modes: list[str], lora_params: int) -> dict[str, float]:
    """Model and hardware FLOPs per token of one distill step (the formulas of the module docstring)."""
    num_linear = modes.count("linear")
    n = matmul_params(config)
    head = config.hidden_size * config.vocab_size
    a_hybrid = attention_flops_per_token(config, seq_len, num_linear_layers=num_linear)
    student = model_flops_per_token(config, seq_len, weight_grads=False, num_linear_layers=num_linear) \
        + 6 * lora_params
    teacher = model_flops_per_token(config, seq_len, training=False)
    recompute = 2 * (n - head) + 2 * lora_params + a_hybrid + 4 * head
    return {"student": student, "teacher": teacher, "model": student + teacher, "recompute": recompute,
            "hardware": student + teacher + recompute}


def gate_search_flops_per_token(config, seq_len: int) -> float:
    """Hardware FLOPs per token of a gate-search step (every layer runs both branches; frozen weights; the decoder
    recomputed under checkpointing); used only to predict probe times."""
    layers = config.num_hidden_layers
    both = dict(num_full_layers=layers, num_linear_layers=layers)
    head = config.hidden_size * config.vocab_size
    return (model_flops_per_token(config, seq_len, weight_grads=False, **both)
            + 2 * (matmul_params(config) - head) + attention_flops_per_token(config, seq_len, **both))


# ------------------------------------------------------------------------------------------------ estimator


def estimator_setup(args, modes: list[str], seq_len: int, dtype: torch.dtype, trainable: str = "lora"):
    """The flashmorph.estimate setup of this benchmark's step on one GPU (tp = sp = 1, ZeRO-3, batch 1)."""
    if trainable == "gates":
        return EstimateSetup(gpus=1, seq_len=seq_len, dtype=dtype_name(dtype), trainable="gates",
                             full_layers="mixed", activation_checkpointing=args.checkpointing, zero_stage=3)
    return EstimateSetup(gpus=1, seq_len=seq_len, dtype=dtype_name(dtype), trainable="lora",
                         lora_rank=args.lora_rank, lora_modules=tuple(STAGE_DEFAULTS.lora_targets),
                         lora_linear_layers_only=True, full_layers=modes.count("full"),
                         activation_checkpointing=args.checkpointing, zero_stage=3, loss_chunk=args.token_chunk,
                         vocab_chunk=args.vocab_chunk)


def estimator_max_len(args, config, modes, dtype, trainable: str, device: torch.device) -> int | None:
    """The estimator's longest seq_len for this device's memory (None on CPU)."""
    if device.type != "cuda":
        return None
    gib = torch.cuda.get_device_properties(device).total_memory / GIB
    shape = shape_from_hf_config(config.to_dict(), name=args.shape)
    return max_seq_len(shape, estimator_setup(args, modes, 1024, dtype, trainable), gib)


# ------------------------------------------------------------------------------------------------ P6 search


class OutOfTime(Exception):
    """A probe would not finish within --time-budget-s."""


class Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds if seconds > 0 else None

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.monotonic()


class LengthProbe:
    """fits(length) for the P6 search: one step at `length`, out-of-memory caught, memoised; every probe is a row.

    `known` holds lengths already measured ({length: (fits, seconds)}), so the search never repeats them.
    """

    def __init__(self, kind: str, step_at, recover, flops_at, deadline: Deadline, results: Results, device,
                 rebuild_s: float = 0.0):
        self.kind, self.step_at, self.recover, self.flops_at = kind, step_at, recover, flops_at
        self.deadline, self.results, self.device, self.rebuild_s = deadline, results, device, rebuild_s
        self.known: dict[int, tuple[bool, float | None]] = {}

    def predict_s(self, length: int) -> float:
        """Seconds per FLOP of the longest measured step x this length's FLOPs, plus a rebuild after an OOM."""
        timed = [(n, s) for n, (ok, s) in self.known.items() if ok and s]
        if not timed:
            return 0.0
        n, seconds = max(timed)
        return seconds / (self.flops_at(n) * n) * self.flops_at(length) * length + self.rebuild_s

    def __call__(self, length: int) -> bool:
        if length in self.known:
            return self.known[length][0]
        need = self.predict_s(length)
        if need > self.deadline.left():
            raise OutOfTime(f"a step at {format_length(length)} (predicted {need:.0f} s) would pass the time budget "
                            f"({self.deadline.left():.0f} s left)")
        reset_peak(self.device)
        before = allocated(self.device)
        started = time.perf_counter()
        outcome = step_or_oom(lambda: self.step_at(length), self.device)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        fits = not (isinstance(outcome, str) and outcome == OOM)
        peak = read_peak(self.device)
        if not fits:
            self.recover()
        self.known[length] = (fits, seconds if fits else None)
        self.results.add_row(kind=self.kind, length=length, fits=fits, peak_bytes=peak, allocated_before_bytes=before,
                             seconds=seconds, predicted_s=need or None)  # an OOM's: until it struck, its peak so far
        return fits


# what allocation failures outside torch's allocator say (cuBLAS/cuDNN workspaces); the device stays usable
ALLOCATION_FAILURES = ("out of memory", "ALLOC_FAILED", "NOT_ENOUGH_WORKSPACE")


def step_or_oom(fn, device: torch.device):
    """common.run_or_oom, also counting a library's failed allocation (a RuntimeError naming it) as OOM."""
    try:
        return run_or_oom(fn, device)
    except RuntimeError as err:
        if not any(text in str(err) for text in ALLOCATION_FAILURES):
            raise
        print(f"  out of memory (library): {str(err).splitlines()[0][:160]}", flush=True)
    free_memory(device)  # outside the except block: the traceback's frames are gone
    return OOM


def search_longest(fits, good: int, limit: int, granularity: int, guess: int | None = None) -> int:
    """The longest multiple of `granularity` in [good, limit] that fits, given that `good` fits and memory grows
    with length. A `guess` (from a line through measured peaks) and its neighbour are probed first: when memory is
    linear in length that decides it in two probes; whatever they leave open, doubling then bisection settles."""
    bad = None
    if guess is not None:
        first = min(max(guess // granularity * granularity, good + granularity), limit)
        if first > good:
            if fits(first):
                good = first
                if first + granularity <= limit:
                    if fits(first + granularity):
                        good = first + granularity
                    else:
                        bad = first + granularity
            else:
                bad = first
                if first - granularity > good:
                    if fits(first - granularity):
                        good = first - granularity
                    else:
                        bad = first - granularity
    if bad is None:
        return largest_fitting_length(fits, good, limit, granularity)  # fits(good) is known: no probe
    return bisect_length(fits, good, bad, granularity)


def linear_guess(points: list[tuple[int, int]], device: torch.device) -> int | None:
    """The length at which a least-squares line through (length, peak bytes) reaches this device's memory less
    ALLOCATOR_RESERVE; None without two measured peaks (CPU) or with a flat line."""
    points = [(n, p) for n, p in points if isinstance(p, int)]
    if device.type != "cuda" or len({n for n, _ in points}) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_p = sum(p for _, p in points) / len(points)
    slope = sum((n - mean_n) * (p - mean_p) for n, p in points) / sum((n - mean_n) ** 2 for n, _ in points)
    if slope <= 0:
        return None
    capacity = torch.cuda.get_device_properties(device).total_memory - ALLOCATOR_RESERVE
    return int(mean_n + (capacity - mean_p) / slope)


def run_search(probe: LengthProbe, start: int, args, guess: int | None) -> dict:
    """P6 over `probe`: {longest, complete, first_oom, stopped}; `longest` is a lower bound when not complete."""
    stopped = None
    longest = None
    try:
        if probe(start):
            longest = search_longest(probe, start, args.p6_limit, args.p6_granularity, guess)
    except OutOfTime as err:
        stopped = str(err)
        print(f"  P6 {probe.kind}: stopped, {stopped}", flush=True)
    fitting = [n for n, (ok, _) in probe.known.items() if ok]
    failing = [n for n, (ok, _) in probe.known.items() if not ok]
    if longest is None:
        longest = max(fitting, default=None)
    return {"longest": longest, "complete": stopped is None, "first_oom": min(failing, default=None),
            "stopped": stopped, "guess": guess}


def p6_ratio(label: str, search: dict, target: str, estimator_len: int | None) -> Ratio:
    longest = search["longest"]
    value = None if longest is None else longest / 1024
    parts = [f"longest fitting {format_length(longest) if longest else 'none'}"]
    if search["first_oom"]:
        parts.append(f"shortest OOM {format_length(search['first_oom'])}")
    if not search["complete"]:
        parts.append("LOWER BOUND: search stopped by the time budget")
    if search["guess"]:
        parts.append(f"line through peaks predicted {format_length(search['guess'])}")
    if estimator_len:
        parts.append(f"estimator predicts {format_length(estimator_len)}")
    return Ratio(label, value, target, "; ".join(parts))


# ------------------------------------------------------------------------------------------------ sections


class Bench:
    """The run's shared state: arguments, device, results table and the current distill engine."""

    def __init__(self, args, device, dtype, results: Results):
        self.args, self.device, self.dtype, self.results = args, device, dtype, results
        self.deadline = Deadline(args.time_budget_s)
        self.ratios: list[Ratio] = []
        self.distill: DistillEngine | None = None
        self.builds = 0
        self.engines_not_freed = 0
        self.measured: dict[int, tuple[bool, float | None]] = {}  # distill lengths stepped outside P6
        self.peaks: list[tuple[int, int | None]] = []  # (length, peak) of distill steps, for the P6 line
        self.device_name = results.data["environment"]["device"]

    def add_ratio(self, r: Ratio) -> None:
        self.ratios.append(r)
        self.results.set_ratios(self.ratios)

    def engine(self) -> DistillEngine:
        if self.distill is None:
            self.distill = build_distill(self.args, self.device, self.dtype)
            self.builds += 1
            self.results.data.setdefault("engine_build_s", []).append(self.distill.build_s)
            print(f"  distill engine built in {self.distill.build_s:.1f} s (build {self.builds})", flush=True)
        return self.distill

    def drop_engine(self) -> None:
        """Free the distill engine; a model that outlives it (something still refers to it) is counted, since the
        next build would then share the device with it."""
        if self.distill is None:
            return
        module = weakref.ref(self.distill.engine.module)
        self.distill.close()
        self.distill = None
        free_memory(self.device)
        if module() is not None:
            self.engines_not_freed += 1
            print("  WARNING: the dropped distill model is still referenced; later peaks include it", flush=True)
        self.results.data["engines_not_freed"] = self.engines_not_freed

    def distill_step_at(self, length: int) -> None:
        d = self.engine()
        input_ids, position_ids = random_tokens(d.config.vocab_size, length, self.device, self.args.seed)
        d.step(input_ids, position_ids)

    def timed_step(self, length: int) -> tuple[float, int | None, int | None]:
        """(seconds, peak bytes, bytes allocated before) of one distill step at `length`."""
        d = self.engine()
        input_ids, position_ids = random_tokens(d.config.vocab_size, length, self.device, self.args.seed)
        reset_peak(self.device)
        before = allocated(self.device)
        started = time.perf_counter()
        d.step(input_ids, position_ids)
        synchronize(self.device)
        return time.perf_counter() - started, read_peak(self.device), before


def run_p5(bench: Bench) -> None:
    args, device = bench.args, bench.device
    d = bench.engine()
    length = args.length
    input_ids, position_ids = random_tokens(d.config.vocab_size, length, device, args.seed)
    started = time.perf_counter()
    times = time_call(lambda: d.step(input_ids, position_ids), device, warmup=args.warmup, iters=args.iters)
    print(f"  P5: {args.warmup} warm-up + {args.iters} timed steps took {time.perf_counter() - started:.1f} s",
          flush=True)
    step_s = median(times)
    per_token = distill_flops_per_token(d.config, length, d.modes, d.lora_params)
    model_flops, hardware_flops = per_token["model"] * length, per_token["hardware"] * length
    value, hfu = mfu(model_flops, step_s, bench.device_name), mfu(hardware_flops, step_s, bench.device_name)
    bench.measured[length] = (True, step_s)
    bench.results.add_row(kind="p5", length=length, step_s=step_s, step_times_s=times, model_flops=model_flops,
                          hardware_flops=hardware_flops, flops_per_token=per_token, lora_params=d.lora_params,
                          full_layers=[i for i, m in enumerate(d.modes) if m == "full"], mfu=value, hfu=hfu,
                          tokens_per_s=length / step_s)
    peak = peak_flops(bench.device_name)
    formula = (f"(4N + 6N_lora + 3A_hybrid + 2N + A_full) x {format_length(length)} = {model_flops / 1e12:.1f} TFLOP "
               f"/ {step_s:.3f} s / {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'dense bf16 peak (unknown device)'}")
    bench.add_ratio(Ratio(f"P5 MFU @{format_length(length)}: distill step model FLOPs / (time x peak)", value,
                          MFU_TARGET, formula))
    bench.add_ratio(Ratio(f"P5 HFU @{format_length(length)}: incl. checkpoint and loss recompute", hfu, "",
                          f"{hardware_flops / 1e12:.1f} TFLOP / {step_s:.3f} s; {length / step_s:.0f} tokens/s"))


def run_estimate(bench: Bench) -> None:
    args, device = bench.args, bench.device
    for length in args.estimate_lengths:
        d = bench.engine()
        if length not in bench.measured:
            outcome = step_or_oom(lambda: d.step(*random_tokens(d.config.vocab_size, length, device, args.seed)),
                                  device)  # one warm-up step: the engine is already warm from P5
            if isinstance(outcome, str) and outcome == OOM:
                bench.results.add_row(kind="estimate", length=length, measured_peak_bytes=OOM)
                bench.drop_engine()
                continue
        measured = step_or_oom(lambda: bench.timed_step(length), device)
        if isinstance(measured, str) and measured == OOM:
            bench.results.add_row(kind="estimate", length=length, measured_peak_bytes=OOM)
            bench.drop_engine()
            continue
        seconds, peak, before = measured
        bench.measured[length] = (True, seconds)
        bench.peaks.append((length, peak))
        shape = shape_from_hf_config(d.config.to_dict(), name=args.shape)
        est = estimate(shape, estimator_setup(args, d.modes, length, bench.dtype))
        persistent = est.weights + est.teacher_weights + est.gradients + est.optimizer + est.zero_buffers
        dynamic = est.activations + max(est.layer_backward, est.logits_loss)
        bench.results.add_row(kind="estimate", length=length, measured_peak_bytes=peak,
                              measured_persistent_bytes=before,
                              measured_dynamic_bytes=None if peak is None else peak - before,
                              estimated_allocated_bytes=est.allocated, estimated_persistent_bytes=persistent,
                              estimated_dynamic_bytes=dynamic, step_s=seconds, estimate=est.to_dict())
        if peak is None:
            detail = f"measured on CUDA only; estimator allocated {format_bytes(est.allocated)}"
        else:
            detail = (f"{format_bytes(peak)} / {format_bytes(est.allocated)} (persistent {format_bytes(before)} / "
                      f"{format_bytes(persistent)}, dynamic {format_bytes(peak - before)} / {format_bytes(dynamic)})")
        bench.add_ratio(Ratio(f"estimator check @{format_length(length)}: measured peak / estimated allocated",
                              ratio(peak, est.allocated), "", detail))


def run_p6_distill(bench: Bench) -> None:
    args, device = bench.args, bench.device
    d = bench.engine()
    config, modes = d.config, d.modes

    def recover() -> None:
        bench.drop_engine()
        bench.engine()

    probe = LengthProbe("p6_distill", bench.distill_step_at, recover,
                        lambda n: distill_flops_per_token(config, n, modes, d.lora_params)["hardware"],
                        bench.deadline, bench.results, device, rebuild_s=d.build_s)
    probe.known.update(bench.measured)
    fitting = [n for n, (ok, _) in bench.measured.items() if ok]
    start = max(fitting, default=args.p6_start)
    guess = linear_guess(bench.peaks, device)
    search = run_search(probe, start, args, guess)
    est_len = estimator_max_len(args, config, modes, bench.dtype, "lora", device)
    bench.results.data["p6_distill"] = search | {"estimator_max_seq_len": est_len}
    bench.add_ratio(p6_ratio("P6 longest distill context on one GPU (K tokens)", search, CONTEXT_TARGET_K, est_len))


def run_p6_gate(bench: Bench) -> None:
    args, device = bench.args, bench.device
    bench.drop_engine()
    expected_build_s = max(bench.results.data.get("engine_build_s") or [30.0])
    if bench.deadline.left() < 2 * expected_build_s:  # a build and a few short steps at least
        print(f"  P6 gate search: skipped, {bench.deadline.left():.0f} s left of the time budget", flush=True)
        bench.add_ratio(Ratio("P6 longest gate-search context on one GPU (K tokens)", None, "",
                              "not run: the time budget was spent"))
        return
    started = time.perf_counter()
    model = build_morphable(args.shape, device, bench.dtype, checkpointing=args.checkpointing, seed=args.seed)
    set_mode(model, "mixed")
    if args.simulate_oom_above:
        simulate_oom(model.lm, args.simulate_oom_above, args.checkpointing)
    build_s = time.perf_counter() - started
    config = model.lm.config
    bench.results.add_row(kind="gate_search_build", build_s=build_s, allocated_bytes=allocated(device))
    batches: dict[int, dict] = {}

    def step_at(length: int) -> None:
        if length not in batches:
            batches.clear()  # one length's tokens at a time
            batches[length] = retrieval_batch(config.vocab_size, length, 1, device, seed=args.seed)
        train_step(model, batches[length])

    def recover() -> None:
        model.gates.zero_grad(set_to_none=True)
        batches.clear()
        free_memory(device)

    probe = LengthProbe("p6_gate_search", step_at, recover,
                        lambda n: gate_search_flops_per_token(config, n), bench.deadline, bench.results, device)
    points = []
    for i, length in enumerate(args.gate_lengths):
        if i == 0:  # fla is warm from the distill step unless that section did not run
            step_or_oom(lambda: [step_at(length) for _ in range(args.warmup)], device)
        try:
            if probe(length):
                points.append((length, bench.results.rows[-1]["peak_bytes"]))
        except OutOfTime as err:
            print(f"  P6 gate search: skipped {format_length(length)}, {err}", flush=True)
            break
    fitting = [n for n, (ok, _) in probe.known.items() if ok]
    start = max(fitting, default=args.p6_start)
    search = run_search(probe, start, args, linear_guess(points, device))
    est_len = estimator_max_len(args, config, ["mixed"] * config.num_hidden_layers, bench.dtype, "gates", device)
    bench.results.data["p6_gate_search"] = search | {"estimator_max_seq_len": est_len}
    bench.add_ratio(p6_ratio("P6 longest gate-search context on one GPU (K tokens)", search, "", est_len))
    del model, batches
    free_memory(device)


RUNNERS = {"p5": run_p5, "estimate": run_estimate, "p6-distill": run_p6_distill, "p6-gate": run_p6_gate}


def parse_sections(text: str) -> list[str]:
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r}; use some of {','.join(SECTIONS)}")
    return sections


def main(argv: list[str] | None = None) -> list[Ratio]:
    parser = base_parser(__doc__, default_shape="llama3-8b")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"what to run, in this order: {','.join(SECTIONS)}")
    parser.add_argument("--length", type=parse_length, default=parse_length("8K"), help="P5 tokens per step")
    parser.add_argument("--estimate-lengths", type=parse_lengths, default=parse_lengths("8K,16K,32K"))
    parser.add_argument("--gate-lengths", type=parse_lengths, default=parse_lengths("8K,32K"),
                        help="gate-search steps measured before its P6 search (they place its line)")
    parser.add_argument("--p6-start", type=parse_length, default=parse_length("32K"),
                        help="first P6 length when no shorter step was measured")
    parser.add_argument("--p6-limit", type=parse_length, default=parse_length("512K"))
    parser.add_argument("--p6-granularity", type=parse_length, default=parse_length("8K"))
    parser.add_argument("--time-budget-s", type=float, default=0.0,
                        help="P6 starts no probe predicted to end later than this many seconds after start (0: none)")
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of layers kept full (softmax)")
    parser.add_argument("--lora-rank", type=int, default=STAGE_DEFAULTS.lora_rank)
    parser.add_argument("--lora-alpha", type=float, default=STAGE_DEFAULTS.lora_alpha)
    parser.add_argument("--token-chunk", type=int, default=STAGE_DEFAULTS.token_chunk)
    parser.add_argument("--vocab-chunk", type=int, default=STAGE_DEFAULTS.vocab_chunk)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--simulate-oom-above", type=int, default=0,
                        help="testing: raise an out-of-memory error in the backward of steps longer than this")
    args, device, dtype, results = start(parser, argv, "distill_step", TITLE, length=64, estimate_lengths=[64, 128],
                                         gate_lengths=[64, 128], p6_start=64, p6_limit=256, p6_granularity=64,
                                         token_chunk=32, vocab_chunk=128)
    from flashmorph.parallel import distributed

    with distributed.distributed_session():  # ZeRO needs a process group: a world of one
        bench = Bench(args, device, dtype, results)
        try:
            for section in args.sections:
                if bench.deadline.left() <= 0:
                    print(f"== {section}: skipped, the time budget is spent", flush=True)
                    results.data.setdefault("skipped_sections", []).append(section)
                    continue
                started = time.perf_counter()
                print(f"== {section}", flush=True)
                RUNNERS[section](bench)
                print(f"== {section}: {time.perf_counter() - started:.1f} s", flush=True)
        finally:
            bench.drop_engine()
        results.data["engine_builds"] = bench.builds
        notes = [f"shape {args.shape}, {dtype_name(dtype)}; hybrid keeps {args.budget:g} of the layers full; LoRA rank "
                 f"{args.lora_rank} on {'/'.join(STAGE_DEFAULTS.lora_targets)} of the linear layers; checkpointing "
                 f"{'on' if args.checkpointing else 'off'}; tiled KL {args.token_chunk} tokens x {args.vocab_chunk} "
                 f"vocab; DeepSpeed ZeRO-3 on 1 device; random tokens, batch 1",
                 "MFU: model FLOPs per token = student 4N + 6N_lora + 3A_hybrid + teacher 2N + A_full "
                 "(bench/flops.py; recompute excluded); HFU adds 2(N - N_head) + 2N_lora + A_hybrid + 4N_head",
                 "P6: one step per probe; an engine that ran out of memory is rebuilt before the next probe"]
        if bench.engines_not_freed:
            notes.append(f"{bench.engines_not_freed} dropped distill model(s) stayed referenced: later peaks and P6 "
                         "lengths are too pessimistic")
        return results.finish(bench.ratios, notes)


if __name__ == "__main__":
    main()
