"""Gate search: freeze every weight, train only the gates on synthetic retrieval data under ZeRO-3."""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashmorph.checkpoint import atomic
from flashmorph.config import GateSearchRecipe, num_full_layers, validate_recipe
from flashmorph.data import RetrievalDataset
from flashmorph.data.from_model import data_for_model
from flashmorph.errors import Preempted
from flashmorph.io import atomic as io_atomic
from flashmorph.model.load import load_causal_lm
from flashmorph.model.morph import MorphableLM
from flashmorph.parallel import distributed, zero
from flashmorph.run_dir import TEACHER_REPORT_NAME, RunDir, prepare_run_dir, setup_file_logging
from flashmorph.selection.discretize import top_k_indices
from flashmorph.stages.teacher import require_teacher, train_teacher
from flashmorph.telemetry import MetricsWriter
from flashmorph.training.bad_steps import BadStepCounter, any_rank_nonfinite, check_step_applied, poison
from flashmorph.training.batches import sample_indices
from flashmorph.training.checkpointing import resume_checkpoint, save_checkpoint
from flashmorph.training.preemption import PreemptionGuard

log = logging.getLogger(__name__)
WEAK_TEACHER_RECALL = 0.5


@dataclass
class GateSearchResult:
    run_dir: Path
    gate_values: torch.Tensor  # [layers] or [layers, heads], in (0, 1)
    layer_scores: torch.Tensor  # [layers]: the gate, or its mean over heads
    kept_layers: list[int]  # the top-k layers for the recipe's budget, ascending
    final_accuracy: float  # retrieval accuracy of the last step, all ranks
    teacher_report: dict | None  # the embedded teacher's report, when there is one
    resumed: dict | None = None  # the checkpoint this run resumed from and the damaged ones it skipped
    skipped_steps: int = 0  # optimizer steps skipped for NaN/Inf in this process's run


def regularizer(gate_values: torch.Tensor, kind: str, budget_fraction: float) -> torch.Tensor:
    """Linearization pressure: the mean gate, or only its excess over the budget fraction."""
    mean_gate = gate_values.mean()
    if kind == "mean":
        return mean_gate
    return torch.relu(mean_gate - budget_fraction)


def reg_lambda(step: int, weight: float, warmup_steps: int) -> float:
    if warmup_steps == 0:
        return weight
    return weight * min(1.0, (step + 1) / warmup_steps)


def _resolve_model_dir(recipe: GateSearchRecipe, run_dir: Path, info, show_progress: bool,
                       preemption: PreemptionGuard | None) -> tuple[Path, dict | None]:
    if recipe.model.path is not None:
        return Path(recipe.model.path), None
    teacher_dir = RunDir(run_dir).teacher
    distributed.run_on_main(lambda: train_teacher(recipe.teacher, teacher_dir, show_progress, preemption), info)
    report = json.loads((teacher_dir / TEACHER_REPORT_NAME).read_text())
    require_teacher(report, recipe.teacher, teacher_dir)  # TeacherNotReady (exit 3) before any gate is trained
    return teacher_dir, report


def _save_checkpoint(engine, root: Path, step: int, accuracy: float, keep_last: int, info) -> None:
    save_checkpoint(engine, root, step, {"accuracy": accuracy}, keep_last, info)  # storage failures: CheckpointError


def _resume(engine, root: Path, info, step: int | None) -> tuple[int, float, dict | None]:
    """(first step to run, accuracy of the last step done, what was resumed) from the newest intact checkpoint,
    or from the one of `step`."""
    state = resume_checkpoint(engine, root, info, step)
    return (0, float("nan"), None) if state is None else (state["step"], state["accuracy"], state["resume"])


def run_gate_search(recipe: GateSearchRecipe, info: distributed.DistInfo, resume: bool = False,
                    show_progress: bool = True, preemption: PreemptionGuard | None = None,
                    dataset=None, resume_from: int | None = None) -> GateSearchResult:
    """Train the gates of a morphed model; writes gates.safetensors and summary.json into run.run_dir.

    `dataset` replaces the retrieval stream built from recipe.data: anything whose `batch(indices)` gives input_ids
    and labels of data.seq_len tokens (e.g. a retrieval/text mixture); the loss covers every labelled token.

    With `preemption`, a stop signal on any rank ends the run after the current step with a complete
    checkpoint and raises `Preempted` (the launcher turns it into PREEMPTED_EXIT_CODE).
    `resume_from` (implies `resume`) resumes from that step's checkpoint instead of the newest intact one.
    """
    resume = resume or resume_from is not None
    shape = validate_recipe(recipe)
    search = recipe.search
    run_dir = Path(recipe.run.run_dir)
    distributed.run_on_main(lambda: prepare_run_dir(run_dir, recipe.to_dict(), resume=resume), info)
    setup_file_logging(run_dir, info.rank)
    model_dir, teacher_report = _resolve_model_dir(recipe, run_dir, info, show_progress, preemption)
    if dataset is None:
        space, haystack = data_for_model(model_dir, recipe.data, shape.vocab_size)
        dataset = RetrievalDataset(recipe.data, space, haystack=haystack)

    ds_config = zero.build_ds_config(
        micro_batch_size=search.micro_batch_size, grad_accum_steps=search.grad_accum_steps,
        world_size=info.world_size, dtype=recipe.model.dtype, zero_stage=recipe.parallel.zero_stage,
        lr=search.lr, weight_decay=search.weight_decay, grad_clip=search.grad_clip,
        override_file=recipe.parallel.deepspeed_config)
    with zero.zero3_model_init(ds_config):
        lm = load_causal_lm(model_dir, recipe.model.dtype)
    if recipe.model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(recipe.run.seed)
    model = MorphableLM(lm, recipe.morph)
    engine = zero.initialize_engine(model, list(model.gates.parameters()), ds_config)
    engine.train()

    root = RunDir(run_dir).checkpoints
    start_step, accuracy, resumed = _resume(engine, root, info, resume_from) if resume else (0, float("nan"), None)

    num_layers = shape.num_layers
    k = num_full_layers(search.budget, num_layers)
    budget_fraction = k / num_layers
    accum, world = search.grad_accum_steps, info.world_size
    writer = MetricsWriter(RunDir(run_dir).tb, enabled=info.is_main)
    bar = tqdm(total=search.steps, initial=start_step, desc="gate search", disable=not (info.is_main and show_progress))
    bad_steps = BadStepCounter("gate search", search.max_bad_steps, "search.max_bad_steps")
    for step in range(start_step, search.steps):
        started = time.perf_counter()
        batches = [dataset.batch(sample_indices(step, m, info.rank, world, search.micro_batch_size, accum))
                   for m in range(accum)]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        step_tokens = distributed.all_reduce_sum(torch.tensor(float(local_tokens), device=info.device)).item()
        # DeepSpeed divides each micro loss by accum and averages over ranks; this scale turns the
        # per-rank sums back into the mean over the whole step's answer tokens, for any world size
        ce_scale = accum * world / max(step_tokens, 1.0)
        lam = reg_lambda(step, search.reg_weight, search.reg_warmup_steps)
        totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # ce_sum, tokens, correct, reg
        step_bad = False
        for batch in batches:
            out = engine(batch["input_ids"].to(info.device), labels=batch["labels"].to(info.device))
            reg = regularizer(out["gate_values"], search.regularizer, budget_fraction)
            loss = out["loss_sum"] * ce_scale + lam * reg
            # every rank must agree before engine.step(): a NaN on one rank poisons the step on all of them
            step_bad = any_rank_nonfinite((loss, out["gate_values"]), info.device) or step_bad
            engine.backward(poison(loss) if step_bad else loss)
            engine.step()
            totals += torch.stack([out["loss_sum"].detach().double(), out["num_tokens"].double(),
                                   out["num_correct"].double(), reg.detach().double() / accum])
        bad, what = check_step_applied(engine, step_bad, recipe.model.dtype, "loss or gates")
        if bad:
            writer.scalars(step + 1, {"numerics/skipped_steps": bad_steps.skipped + 1})
        bad_steps.record(step + 1, bad, what)  # NumericalFault after search.max_bad_steps in a row
        gate_values = out["gate_values"].detach().float().cpu()
        distributed.all_reduce_sum(totals)
        ce = (totals[0] / totals[1]).item()
        accuracy = (totals[2] / totals[1]).item()
        reg_value = totals[3].item() / world
        elapsed = time.perf_counter() - started
        seq_tokens = sum(b["input_ids"].numel() for b in batches) * world
        if (step + 1) % search.log_every == 0 or step + 1 == search.steps:
            writer.scalars(step + 1, {
                "loss/total": ce + lam * reg_value, "loss/retrieval": ce, "loss/regularizer": reg_value,
                "reg/lambda": lam, "acc/retrieval": accuracy, "perf/tokens_per_s": seq_tokens / elapsed,
                "perf/step_time_s": elapsed, "numerics/skipped_steps": bad_steps.skipped,
            })
            writer.gates(step + 1, gate_values)
        bar.update(1)
        bar.set_postfix(ce=f"{ce:.3f}", acc=f"{accuracy:.2f}", gates=" ".join(f"{v:.2f}" for v in
                                                                            model.gates.layer_scores(gate_values)))
        periodic_save = search.save_every and (step + 1) % search.save_every == 0 and step + 1 < search.steps
        if periodic_save:
            _save_checkpoint(engine, root, step + 1, accuracy, search.keep_last, info)
        if preemption is not None and step + 1 < search.steps and preemption.stop_requested(info.device):
            if not periodic_save:
                _save_checkpoint(engine, root, step + 1, accuracy, search.keep_last, info)
            bar.close()
            writer.close()
            raise Preempted(step + 1, atomic.checkpoint_dir(root, step + 1), preemption.reason)
    bar.close()
    if start_step < search.steps:
        _save_checkpoint(engine, root, search.steps, accuracy, search.keep_last, info)
    writer.close()

    logits = zero.full_state(model.gates)["gate_logits"]
    gate_values = torch.sigmoid(logits)
    layer_scores = model.gates.layer_scores(gate_values)
    kept = top_k_indices(layer_scores, k)  # the same rule tools/discretize_gates.py applies
    result = GateSearchResult(run_dir, gate_values, layer_scores, kept, accuracy, teacher_report, resumed,
                              bad_steps.skipped)
    # on rank 0, and a full disk there raises on every rank instead of leaving the others at a barrier
    distributed.run_on_main(lambda: _write_outputs(result, recipe, k, model_dir, info.world_size), info)
    return result


def _write_outputs(result: GateSearchResult, recipe: GateSearchRecipe, k: int, model_dir: Path,
                   world_size: int) -> None:
    metadata = {"granularity": recipe.morph.gate_granularity, "num_layers": str(len(result.layer_scores)),
                "steps": str(recipe.search.steps), "model": str(model_dir)}
    # clone: for per-layer gates both tensors view the same storage, which safetensors refuses to write
    io_atomic.atomic_save_safetensors({"gate_values": result.gate_values.detach().clone().contiguous(),
                                       "layer_scores": result.layer_scores.detach().clone().contiguous()},
                                      RunDir(result.run_dir).gates, metadata=metadata)
    ranking = torch.sort(result.layer_scores, descending=True, stable=True).indices.tolist()
    summary = {
        "layer_scores": [round(v, 4) for v in result.layer_scores.tolist()],
        "ranking": ranking,
        "budget": recipe.search.budget,
        "steps": recipe.search.steps,
        "samples_per_step": recipe.search.micro_batch_size * recipe.search.grad_accum_steps * world_size,
        "num_full_layers": k,
        "kept_layers": result.kept_layers,
        "final_retrieval_accuracy": result.final_accuracy,
        "teacher": result.teacher_report,
        "resumed": result.resumed,
        "skipped_nonfinite_steps": result.skipped_steps,
    }
    io_atomic.atomic_write_text(RunDir(result.run_dir).summary, json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)


def format_summary(summary: dict) -> str:
    lines = ["", "gate search summary", "-------------------"]
    teacher = summary.get("teacher")
    if teacher:
        lines.append(f"teacher recall: {100 * teacher['recall_accuracy']:.1f}% on {teacher['num_pairs']} pairs "
                     f"(chance {100 * teacher['chance_accuracy']:.1f}%)")
        if not teacher.get("curriculum_complete", True):
            stalled = [s["num_pairs"] for s in teacher["stages"] if not s["advanced"]]
            lines.append(f"WARNING: the teacher's curriculum never finished (stalled at {stalled} pairs); these gates "
                         "rank the layers of a model that does not retrieve reliably")
        if teacher["recall_accuracy"] < WEAK_TEACHER_RECALL:
            lines.append("warning: the teacher barely retrieves, so the gates have little to defend; "
                         "rerun with --override teacher.seed=1 (and a fresh run.run_dir)")
    lines.append(f"retrieval accuracy at the last step: {100 * summary['final_retrieval_accuracy']:.1f}%")
    lines.append("gates, highest first (1 = softmax, 0 = linear):")
    scores = summary["layer_scores"]
    for rank, layer in enumerate(summary["ranking"]):
        marker = "  <- kept as full attention" if layer in summary["kept_layers"] else ""
        lines.append(f"  {rank + 1:>3}. layer {layer:>3}: {scores[layer]:.4f}{marker}")
    lines.append(f"budget {summary['budget']} -> {summary['num_full_layers']} full-attention layers: "
                 f"{summary['kept_layers']}")
    return "\n".join(lines)
