"""Distillation and long-context finetuning: the hybrid student learns the original model's logits (tiled KL).

One step serves both stages; long-context only adds a length curriculum. Runs under ZeRO-3 on any number of
ranks, with optional Ulysses sequence parallelism and megatron tensor parallelism (composed in parallel.mesh).
"""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flashmorph.config import DistillRecipe, validate_distill_recipe
from flashmorph.data import RetrievalDataset
from flashmorph.data.from_model import data_for_model
from flashmorph.data.length_schedule import LengthSchedule
from flashmorph.data.mixture import text_retrieval_mixture
from flashmorph.data.packed_text import PackedTextDataset
from flashmorph.io import atomic as io_atomic
from flashmorph.model.hybrid import apply_hybrid_layout, read_layout
from flashmorph.model.morph import apply_layer_modes
from flashmorph.parallel import distributed, zero
from flashmorph.parallel.layout import layout_from_config
from flashmorph.parallel.mesh import Mesh, destroy_mesh, init_mesh
from flashmorph.parallel.sharded_load import load_for_mesh
from flashmorph.run_dir import RunDir, prepare_run_dir, setup_file_logging
from flashmorph.training import lora
from flashmorph.training.batches import sample_indices
from flashmorph.training.distill_model import DistillModel, base_lm
from flashmorph.training.loop import LoopConfig, StepLog, train
from flashmorph.training.preemption import PreemptionGuard

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    run_dir: Path
    kl_history: list[float]  # per-token KL of every step this call ran, in order
    steps: int  # the step the run ended at
    student_dir: Path | None  # the exported hybrid (HF directory), when one was written


# ------------------------------------------------------------------------------------------------ building


def _student_source(recipe: DistillRecipe) -> Path:
    """Full/linear finetunes continue from a previous run's exported student; LoRA always starts from the base."""
    init_from = recipe.student.init_from
    if init_from is not None and recipe.distill.trainable != "lora":
        return RunDir(init_from).student
    return Path(recipe.model.path)


def build_distill_model(recipe: DistillRecipe, ds_config: dict, mesh: Mesh) -> tuple[DistillModel, list]:
    """Student (hybrid, trainable set applied), teacher, and the trainable parameters; parallel layers swapped in."""
    cfg, dtype = recipe.distill, recipe.model.dtype
    student = load_for_mesh(_student_source(recipe), mesh, dtype, ds_config)
    teacher = load_for_mesh(recipe.model.path, mesh, dtype, ds_config) if cfg.trainable != "lora" else None
    modes = read_layout(recipe.student.layout, student.config.num_hidden_layers)
    model, trainable = prepare_distill_model(student, teacher, modes, cfg, recipe.morph, mesh,
                                             recipe.model.activation_checkpointing)
    if cfg.trainable == "lora" and recipe.student.init_from is not None:
        lora.load_adapter(model.student, RunDir(recipe.student.init_from).adapter,
                          tensor_parallel=mesh.layout.tensor > 1)
    return model, trainable


def prepare_distill_model(student, teacher, modes: list[str], cfg, morph_config, mesh: Mesh | None,
                          activation_checkpointing: bool) -> tuple[DistillModel, list]:
    """The loaded `student` made the `modes` hybrid with cfg.trainable's set trainable, `teacher` (None for LoRA: the
    student with adapters off) all softmax and frozen; with `mesh`, both split for its TP and SP degrees."""
    num_layers = student.config.num_hidden_layers
    apply_hybrid_layout(student, modes, morph_config)
    student.requires_grad_(False)
    models = [student]
    if teacher is not None:
        apply_layer_modes(teacher, morph_config, ["full"] * num_layers)
        teacher.requires_grad_(False)
        models.append(teacher)
    if mesh is not None:
        parallelize_distill_models(models, mesh, cfg.micro_batch_size)
    if activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    linear_layers = [i for i, mode in enumerate(modes) if mode == "linear"]
    if cfg.trainable == "lora":
        student = lora.add_lora(student, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                layers=linear_layers if cfg.lora_linear_layers_only else None,
                                tensor_parallel=mesh is not None and mesh.layout.tensor > 1)
    elif cfg.trainable == "linear":
        for idx in linear_layers:
            attn = student.model.layers[idx].self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(attn, name).requires_grad_(True)
    else:
        student.requires_grad_(True)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("the trainable set is empty: the layout has no linear layer to adapt "
                           "(set distill.lora_linear_layers_only=false or pick another layout)")
    model = DistillModel(student, teacher, temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                         token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk)
    return model, trainable


def parallelize_distill_models(models: list, mesh: Mesh, micro_batch_size: int) -> None:
    """Megatron TP and Ulysses SP layers swapped into each HF model, for the mesh's degrees (requires_grad kept);
    a model that load_sharded_causal_lm already split over TP keeps its layers."""
    from flashmorph.parallel.sequence import install_sequence_parallel
    from flashmorph.parallel.tensor import apply_tensor_parallel, tensor_parallel_state

    for lm in models:
        if mesh.layout.tensor > 1 and tensor_parallel_state(lm) is None:
            apply_tensor_parallel(lm, mesh)
        if mesh.layout.sequence > 1:
            install_sequence_parallel(lm, mesh.sp_group, micro_batch_size)


def build_datasets(recipe: DistillRecipe, vocab_size: int, info) -> dict:
    """seq_len -> dataset: retrieval samples, mixed with packed natural text when text.weight > 0."""
    model_dir, run_dir = recipe.model.path, Path(recipe.run.run_dir)
    lengths = [s.seq_len for s in recipe.distill.length_schedule] or [recipe.data.seq_len]
    text = None
    if recipe.text.weight > 0:
        # the main rank tokenizes and caches the corpus first, so the other ranks read the cache instead of racing
        def load_text():
            return PackedTextDataset.from_model(recipe.text, model_dir, vocab_size, lengths[0], work_dir=run_dir)

        text = distributed.run_on_main(load_text, info)
        if not info.is_main:
            text = load_text()
    out = {}
    for seq_len in lengths:
        data_cfg = dataclasses.replace(recipe.data, seq_len=seq_len)
        space, haystack = data_for_model(model_dir, data_cfg, vocab_size)
        retrieval = RetrievalDataset(data_cfg, space, haystack=haystack)
        if text is None:
            out[seq_len] = retrieval
        else:
            out[seq_len] = text_retrieval_mixture(retrieval, text.with_seq_len(seq_len), recipe.text.weight,
                                                  seed=recipe.text.seed)
    return out


# ------------------------------------------------------------------------------------------------ the loop


def _local_batch(batch: dict, mesh: Mesh, device) -> dict:
    """This rank's share of a [B, T] batch: its sequence slice under SP, with global positions and labels
    shifted on the full sequence (so a shard's last token is scored against the next shard's first)."""
    from flashmorph.parallel.sequence import shard_sequence

    input_ids, labels = batch["input_ids"], batch["labels"]
    shard = shard_sequence(input_ids, labels, mesh.sp_rank, mesh.layout.sequence)
    return {key: value.to(device) for key, value in shard.items()}


def run_distill(recipe: DistillRecipe, info: distributed.DistInfo, resume: bool = False, show_progress: bool = True,
                stage: str = "distill", preemption: PreemptionGuard | None = None,
                resume_from: int | None = None) -> DistillResult:
    """Train the student; writes checkpoints, tensorboard, summary.json and the exported student into run_dir.

    With `preemption`, a stop signal on any rank ends the run after the current step with a complete checkpoint
    and raises `Preempted` (the launcher turns it into PREEMPTED_EXIT_CODE). `resume_from` (implies `resume`)
    resumes from that step's checkpoint instead of the newest intact one.
    """
    shape = validate_distill_recipe(recipe, info.world_size)
    mesh = init_mesh(layout_from_config(recipe.parallel, info.world_size))
    try:
        return _run(recipe, info, mesh, shape, resume or resume_from is not None, resume_from, show_progress, stage,
                    preemption)
    finally:
        destroy_mesh()


def distill_ds_config(recipe: DistillRecipe, dp_size: int) -> dict:
    """The DeepSpeed config of distillation: ZeRO over the data-parallel ranks, AdamW with warm-up."""
    cfg = recipe.distill
    return zero.build_ds_config(
        micro_batch_size=cfg.micro_batch_size, grad_accum_steps=cfg.grad_accum_steps, world_size=dp_size,
        dtype=recipe.model.dtype, zero_stage=recipe.parallel.zero_stage, lr=cfg.lr, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, warmup_steps=cfg.warmup_steps, override_file=recipe.parallel.deepspeed_config)


def build_distill(recipe: DistillRecipe, mesh: Mesh) -> tuple[DistillModel, list, object]:
    """(model, trainable parameters, engine): the student and teacher of build_distill_model under DeepSpeed."""
    ds_config = distill_ds_config(recipe, mesh.layout.data)
    torch.manual_seed(recipe.run.seed)
    model, trainable = build_distill_model(recipe, ds_config, mesh)
    engine = zero.initialize_engine(model, trainable, ds_config, mpu=mesh.mpu)
    engine.train()
    return model, trainable, engine


class DistillStep:
    """One optimizer step of distillation: grad_accum_steps micro batches at the schedule's length, per rank."""

    def __init__(self, engine, datasets: dict, schedule: LengthSchedule, cfg, mesh: Mesh, info):
        self.engine, self.datasets, self.schedule, self.cfg, self.mesh, self.info = (engine, datasets, schedule, cfg,
                                                                                      mesh, info)
        self.kl_history: list[float] = []  # per-token KL of every step run, in order
        self.kl_by_length: dict[int, list[float]] = {}  # seq_len -> [first, last] KL of the steps run at that length

    def micro_batches(self, step: int):
        cfg, mesh = self.cfg, self.mesh
        accum, micro, dp_size = cfg.grad_accum_steps, cfg.micro_batch_size, mesh.layout.data
        self.seq_len = self.schedule.seq_len_at(step)
        dataset = self.datasets[self.seq_len]
        self.global_tokens = micro * accum * dp_size * self.seq_len
        # DeepSpeed divides each micro loss by accum and averages gradients over the SP x DP ranks that hold the
        # same weights (mesh.grad_divisor); this scale turns per-rank token sums into the step's mean per token
        self.scale = accum * mesh.grad_divisor / self.global_tokens
        self.totals = torch.zeros(2, dtype=torch.float64)  # kl_sum, ce_sum over this rank's tokens
        return (_local_batch(dataset.batch(sample_indices(step, m, mesh.dp_rank, dp_size, micro, accum)), mesh,
                             self.info.device) for m in range(accum))

    def micro_step(self, local: dict) -> tuple[torch.Tensor, tuple]:
        sums = self.engine(local["input_ids"], local["position_ids"], local["shift_labels"])
        self.totals += torch.stack([sums["kl_sum"].detach().double().cpu(), sums["ce_sum"].detach().double().cpu()])
        return sums["loss_sum"] * self.scale, ()

    def finish(self, step: int) -> StepLog:
        # TP ranks hold the same tokens: sum over the data x sequence ranks of TP rank 0's share only
        totals = self.totals * (1.0 if self.mesh.tp_rank == 0 else 0.0)
        totals = distributed.all_reduce_sum(totals.to(self.info.device)).cpu()
        kl, ce = (totals / self.global_tokens).tolist()
        self.kl_history.append(kl)
        self.kl_by_length.setdefault(self.seq_len, [kl, kl])[1] = kl
        scalars = {"loss/kl": kl, "loss/ce": ce, "loss/total": kl + self.cfg.ce_weight * ce,
                   "lr": self.engine.get_lr()[0], "data/seq_len": self.seq_len}
        return StepLog(scalars, self.global_tokens, {"kl": f"{kl:.4f}", "len": self.seq_len}, {"kl": kl})


def _run(recipe, info, mesh, shape, resume, resume_from, show_progress, stage, preemption) -> DistillResult:
    cfg = recipe.distill
    run_dir = Path(recipe.run.run_dir)
    distributed.run_on_main(lambda: prepare_run_dir(run_dir, recipe.to_dict(), resume=resume), info)
    setup_file_logging(run_dir, info.rank)
    datasets = build_datasets(recipe, shape.vocab_size, info)
    schedule = LengthSchedule([(s.seq_len, s.steps) for s in cfg.length_schedule] or [(recipe.data.seq_len, cfg.steps)])
    model, trainable, engine = build_distill(recipe, mesh)
    n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    log.info("%s: %d trainable parameters (%s), layout tp=%d sp=%d dp=%d", stage, n_trainable, cfg.trainable,
             mesh.layout.tensor, mesh.layout.sequence, mesh.layout.data)
    step_fn = DistillStep(engine, datasets, schedule, cfg, mesh, info)
    loop = LoopConfig(stage, schedule.total_steps, cfg.log_every, cfg.save_every, cfg.keep_last, cfg.max_bad_steps,
                      "distill.max_bad_steps", recipe.model.dtype)
    done = train(step_fn, loop, run_dir, info, resume=resume, resume_from=resume_from, show_progress=show_progress,
                 preemption=preemption)
    student_dir = _write_outputs(recipe, model, mesh, info, step_fn.kl_history, step_fn.kl_by_length, done.start_step,
                                 schedule.total_steps, stage, done.resumed["resume"] if done.resumed else None,
                                 done.skipped_steps)
    distributed.barrier()  # _write_outputs gathers on every rank, writes on rank 0
    return DistillResult(run_dir, step_fn.kl_history, schedule.total_steps, student_dir)


# ------------------------------------------------------------------------------------------------ outputs


def _write_outputs(recipe, model: DistillModel, mesh: Mesh, info, kl_history, kl_by_length, start_step, total_steps,
                   stage, resumed, skipped_steps=0):
    """adapter/ (LoRA), student/ (the hybrid as a HF directory, LoRA merged) and summary.json."""
    from flashmorph.export import save_hybrid

    run_dir = Path(recipe.run.run_dir)
    cfg = recipe.distill
    student_dir = None
    if mesh.layout.tensor > 1 and cfg.trainable != "lora":
        log.info("tensor-parallel run: the student stays in its checkpoint; convert it with tools/reshard.py")
    else:
        if mesh.layout.tensor > 1:  # every rank gathers the TP slices of the (replicated, frozen) base and adapters
            from flashmorph.parallel.lora_tp import gather_lora_model_state

            state = gather_lora_model_state(model.student, mesh, keep=info.is_main)
        else:
            state = zero.gather_state_dict(model.student, keep=info.is_main)
        if info.is_main:
            if cfg.trainable == "lora":
                lora.save_adapter(model.student, state, RunDir(run_dir).adapter)
                state = lora.merge_lora_state(state, cfg.lora_alpha / cfg.lora_rank)
            lm = _materialize(base_lm(model.student), state)
            student_dir = save_hybrid(lm, RunDir(run_dir).student, force=True, tokenizer_from=recipe.model.path)
    if info.is_main:
        summary = {
            "stage": stage,
            "steps": total_steps,
            "first_step_run": start_step,
            "kl_per_token": {"first": kl_history[0] if kl_history else None,
                             "last": kl_history[-1] if kl_history else None,
                             "by_seq_len": {str(k): {"first": v[0], "last": v[1]} for k, v in kl_by_length.items()}},
            "trainable": recipe.distill.trainable,
            "layout": read_layout(recipe.student.layout),
            "parallel": {"tensor": mesh.layout.tensor, "sequence": mesh.layout.sequence, "data": mesh.layout.data},
            "student_dir": str(student_dir) if student_dir else None,
            "resumed": resumed,
            "skipped_nonfinite_steps": skipped_steps,
        }
        io_atomic.atomic_write_text(RunDir(run_dir).summary, json.dumps(summary, indent=2))
        for seq_len, (first, last) in kl_by_length.items():
            print(f"{stage}: KL per token at {seq_len} tokens: {first:.4f} (first step) -> {last:.4f} (last step)",
                  flush=True)
        if student_dir:
            print(f"student (hybrid HF directory): {student_dir}", flush=True)
    return student_dir


def _materialize(template, state: dict[str, torch.Tensor]):
    """A fresh CPU copy of the student's HF model holding `state`, carrying the same hybrid layout."""
    from transformers import AutoModelForCausalLM

    from flashmorph.model.hybrid import SECTION_KEY, read_hybrid_section

    config = template.config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    missing, unexpected = lm.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not name.endswith("lm_head.weight") for name in missing):
        raise RuntimeError(f"student state does not fit its model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if missing:
        lm.tie_weights()
    lm.model.rotary_emb = type(template.model.rotary_emb)(config=config)  # buffers are not parameters
    modes, morph_config = read_hybrid_section(getattr(config, SECTION_KEY))
    apply_hybrid_layout(lm, modes, morph_config)
    return lm
