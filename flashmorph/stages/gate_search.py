"""Gate search: freeze every weight, train only the gates on synthetic retrieval data under ZeRO-3, with optional
megatron tensor parallelism and Ulysses sequence parallelism (composed in parallel.mesh)."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flashmorph.config import GateSearchRecipe, num_full_layers, validate_recipe
from flashmorph.data import RetrievalDataset
from flashmorph.data.from_model import data_for_model
from flashmorph.io import atomic as io_atomic
from flashmorph.parallel import distributed, zero
from flashmorph.parallel.gate_parallel import answer_loss_scale, local_gate_batch, parallelize_gate_search
from flashmorph.parallel.layout import layout_from_config
from flashmorph.parallel.mesh import Mesh, destroy_mesh, init_mesh
from flashmorph.parallel.sharded_load import load_for_mesh
from flashmorph.run_dir import TEACHER_REPORT_NAME, RunDir, prepare_run_dir, setup_file_logging
from flashmorph.selection.discretize import top_k_indices
from flashmorph.stages.teacher import require_teacher, train_teacher
from flashmorph.training.batches import sample_indices
from flashmorph.training.loop import LoopConfig, StepLog, train
from flashmorph.training.losses import retrieval as losses
from flashmorph.training.preemption import PreemptionGuard

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


def _resolve_model_dir(recipe: GateSearchRecipe, run_dir: Path, info, show_progress: bool,
                       preemption: PreemptionGuard | None) -> tuple[Path, dict | None]:
    if recipe.model.path is not None:
        return Path(recipe.model.path), None
    teacher_dir = RunDir(run_dir).teacher
    distributed.run_on_main(lambda: train_teacher(recipe.teacher, teacher_dir, show_progress, preemption), info)
    report = json.loads((teacher_dir / TEACHER_REPORT_NAME).read_text())
    require_teacher(report, recipe.teacher, teacher_dir)  # TeacherNotReady (exit 3) before any gate is trained
    return teacher_dir, report


def gate_search_ds_config(search, parallel, dtype: str, dp_size: int) -> dict:
    """The DeepSpeed config of gate search: ZeRO over the data-parallel ranks, AdamW on the gate logits only."""
    return zero.build_ds_config(
        micro_batch_size=search.micro_batch_size, grad_accum_steps=search.grad_accum_steps, world_size=dp_size,
        dtype=dtype, zero_stage=parallel.zero_stage, lr=search.lr, weight_decay=search.weight_decay,
        grad_clip=search.grad_clip, override_file=parallel.deepspeed_config)


def build_gate_engine(lm, morph_config, ds_config: dict, seed: int, mesh: Mesh,
                      micro_batch_size: int) -> tuple[losses.RetrievalLossModel, object]:
    """Gates around `lm` (frozen; loaded by the caller with `load_for_mesh`: under zero.Init, or TP-sharded),
    split over `mesh` for its TP and SP degrees, and the engine that trains only the gates."""
    torch.manual_seed(seed)  # the gates' initial values
    model = parallelize_gate_search(losses.RetrievalLossModel(lm, morph_config), mesh, micro_batch_size)
    engine = zero.initialize_engine(model, list(model.gates.parameters()), ds_config, mpu=mesh.mpu)
    engine.train()
    return model, engine


def build_gate_search(recipe: GateSearchRecipe, model_dir: Path,
                      mesh: Mesh) -> tuple[losses.RetrievalLossModel, object]:
    """The recipe's model from `model_dir`, partitioned at load (ZeRO-3 at TP=1, each rank's TP slices otherwise),
    with its gates and their engine."""
    ds_config = gate_search_ds_config(recipe.search, recipe.parallel, recipe.model.dtype, mesh.dp_size)
    lm = load_for_mesh(model_dir, mesh, recipe.model.dtype, ds_config)
    if recipe.model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return build_gate_engine(lm, recipe.morph, ds_config, recipe.run.seed, mesh, recipe.search.micro_batch_size)


def gate_search_loss(out: dict, ce_scale: float, lam: float, search, budget_fraction: float):
    """(the micro step's loss, its regularizer term): scaled answer-token CE + lambda x regularizer."""
    reg = losses.regularizer(out["gate_values"], search.regularizer, budget_fraction)
    return out["loss_sum"] * ce_scale + lam * reg, reg


class GateSearchStep:
    """One optimizer step of gate search: grad_accum_steps micro batches of retrieval samples per DP replica, each
    rank taking its share (its sequence slice under SP; TP ranks of a replica take the same)."""

    def __init__(self, engine, model: losses.RetrievalLossModel, dataset, search, info, budget_fraction: float,
                 mesh: Mesh):
        self.engine, self.model, self.dataset, self.search, self.info = engine, model, dataset, search, info
        self.budget_fraction, self.mesh = budget_fraction, mesh

    def micro_batches(self, step: int) -> list[dict]:
        search, info, mesh = self.search, self.info, self.mesh
        accum, micro = search.grad_accum_steps, search.micro_batch_size
        batches = [self.dataset.batch(sample_indices(step, m, mesh.dp_rank, mesh.dp_size, micro, accum))
                   for m in range(accum)]
        local = [local_gate_batch(b, mesh, info.device) for b in batches]  # input_ids, position_ids, shift_labels
        local_tokens = sum(int((b["shift_labels"] != -100).sum()) for b in local)
        # DeepSpeed divides each micro loss by accum and averages over the SP x DP ranks; this scale turns the
        # per-rank sums back into the mean over the whole step's answer tokens, for any layout
        self.ce_scale = answer_loss_scale(local_tokens, mesh, accum, info.device)
        self.lam = losses.reg_lambda(step, search.reg_weight, search.reg_warmup_steps)
        self.totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # ce_sum, tokens, correct, reg
        self.seq_tokens = sum(b["input_ids"].numel() for b in batches) * mesh.dp_size
        return local

    def micro_step(self, local: dict) -> tuple[torch.Tensor, tuple]:
        self.out = self.engine(local["input_ids"], position_ids=local["position_ids"],
                               shift_labels=local["shift_labels"])
        loss, reg = gate_search_loss(self.out, self.ce_scale, self.lam, self.search, self.budget_fraction)
        self.totals += torch.stack([self.out["loss_sum"].detach().double(), self.out["num_tokens"].double(),
                                    self.out["num_correct"].double(),
                                    reg.detach().double() / self.search.grad_accum_steps])
        return loss, (self.out["gate_values"],)

    def finish(self, step: int) -> StepLog:
        gate_values = self.out["gate_values"].detach().float().cpu()
        # TP ranks hold the same tokens (and every rank the same regularizer): sum TP rank 0's share only
        totals = distributed.all_reduce_sum(self.totals * (1.0 if self.mesh.tp_rank == 0 else 0.0))
        ce = (totals[0] / totals[1]).item()
        accuracy = (totals[2] / totals[1]).item()
        reg_value = totals[3].item() / (self.mesh.sp_size * self.mesh.dp_size)
        scalars = {"loss/total": ce + self.lam * reg_value, "loss/retrieval": ce, "loss/regularizer": reg_value,
                   "reg/lambda": self.lam, "acc/retrieval": accuracy}
        gates = " ".join(f"{v:.2f}" for v in self.model.gates.layer_scores(gate_values))
        return StepLog(scalars, self.seq_tokens, {"ce": f"{ce:.3f}", "acc": f"{accuracy:.2f}", "gates": gates},
                       {"accuracy": accuracy}, gates=gate_values)


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
    shape = validate_recipe(recipe, info.world_size)
    mesh = init_mesh(layout_from_config(recipe.parallel, info.world_size))
    try:
        return _run(recipe, info, mesh, shape, resume or resume_from is not None, resume_from, show_progress,
                    preemption, dataset)
    finally:
        destroy_mesh()


def _run(recipe, info, mesh: Mesh, shape, resume, resume_from, show_progress, preemption, dataset) -> GateSearchResult:
    search = recipe.search
    run_dir = Path(recipe.run.run_dir)
    distributed.run_on_main(lambda: prepare_run_dir(run_dir, recipe.to_dict(), resume=resume), info)
    setup_file_logging(run_dir, info.rank)
    model_dir, teacher_report = _resolve_model_dir(recipe, run_dir, info, show_progress, preemption)
    if dataset is None:
        space, haystack = data_for_model(model_dir, recipe.data, shape.vocab_size)
        dataset = RetrievalDataset(recipe.data, space, haystack=haystack)

    model, engine = build_gate_search(recipe, model_dir, mesh)
    k = num_full_layers(search.budget, shape.num_layers)
    step_fn = GateSearchStep(engine, model, dataset, search, info, budget_fraction=k / shape.num_layers, mesh=mesh)
    loop = LoopConfig("gate search", search.steps, search.log_every, search.save_every, search.keep_last,
                      search.max_bad_steps, "search.max_bad_steps", recipe.model.dtype, checked="loss or gates")
    done = train(step_fn, loop, run_dir, info, resume=resume, resume_from=resume_from, show_progress=show_progress,
                 preemption=preemption)
    # a finished run resumed again runs no step: its accuracy is the one its last checkpoint recorded
    state = done.last.checkpoint_state if done.last else done.resumed
    accuracy = state["accuracy"] if state else float("nan")
    resumed = done.resumed["resume"] if done.resumed else None

    logits = zero.full_state(model.gates)["gate_logits"]
    gate_values = torch.sigmoid(logits)
    layer_scores = model.gates.layer_scores(gate_values)
    kept = top_k_indices(layer_scores, k)  # the same rule tools/discretize_gates.py applies
    result = GateSearchResult(run_dir, gate_values, layer_scores, kept, accuracy, teacher_report, resumed,
                              done.skipped_steps)
    # on rank 0, and a full disk there raises on every rank instead of leaving the others at a barrier
    distributed.run_on_main(lambda: _write_outputs(result, recipe, k, model_dir, mesh.dp_size), info)
    return result


def _write_outputs(result: GateSearchResult, recipe: GateSearchRecipe, k: int, model_dir: Path,
                   dp_size: int) -> None:
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
        "samples_per_step": recipe.search.micro_batch_size * recipe.search.grad_accum_steps * dp_size,
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
