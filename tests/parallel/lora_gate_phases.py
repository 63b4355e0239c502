"""LoRA under TP and gate search under TP / SP, run inside tp_world's 4-rank world (its process start-up is the
cost) on each of its meshes, and their one-process twins, run in the parent.

LoRA (TP=2 x DP=2 mesh, each TP pair): a hybrid student with TP=1 adapters sliced in by lora.load_adapter gives the
distill loss and adapter gradients of one process; after an SGD step the gathered adapters save and merge to the
TP=1 files. Gate search (TP=2 x DP=2, TP=2 x SP=2, SP=2 x DP=2): ZeRO-3 over the mesh, as the stage runs it,
trains the gates like plain AdamW on the whole batch in one process.
"""

import tempfile
from pathlib import Path

import torch

# the tiny model of tp_world (2 layers, hidden 64, 4 heads, 2 kv heads, vocab 64), fp32
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # column- and row-parallel projections
LORA_RANK, LORA_ALPHA, LORA_LR = 4, 8.0, 0.5
DISTILL = dict(temperature=2.0, ce_weight=0.5, token_chunk=8, vocab_chunk=24)
GATE_ROWS, GATE_LR, GATE_STEPS, REG_WEIGHT = 4, 5e-2, 3, 0.5


def _tiny():
    from tp_world import tiny

    return tiny()


def _ids(rows: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(11))


# ------------------------------------------------------------------------------------------------------ LoRA


def _lora_student(mesh=None):
    """A hybrid tiny student with LoRA; under `mesh`, its projections split over TP first (as the stage does)."""
    from flashmorph.model.hybrid import apply_hybrid_layout
    from flashmorph.parallel.tensor import apply_tensor_parallel
    from flashmorph.training import lora

    lm = _tiny()
    apply_hybrid_layout(lm, ["full", "linear"])
    lm.requires_grad_(False)
    if mesh is not None:
        apply_tensor_parallel(lm, mesh)
    return lora.add_lora(lm, rank=LORA_RANK, alpha=LORA_ALPHA, targets=LORA_TARGETS, layers=None,
                         tensor_parallel=mesh is not None)


def _distill_batch() -> dict:
    from flashmorph.parallel.sequence import shard_sequence

    ids = _ids(2, 16)
    return shard_sequence(ids, ids, 0, 1)


def _distill_step(student) -> tuple[float, dict]:
    """One distill loss (the student's own softmax teacher, adapters off) and an SGD step on the adapters; returns
    the loss and the adapter gradients."""
    from flashmorph.training.distill_model import DistillModel

    batch = _distill_batch()
    sums = DistillModel(student, None, **DISTILL)(batch["input_ids"], batch["position_ids"], batch["shift_labels"])
    sums["loss_sum"].backward()
    adapters = [p for p in student.parameters() if p.requires_grad]
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.requires_grad}
    torch.optim.SGD(adapters, lr=LORA_LR).step()
    return sums["loss_sum"].item(), grads


def _random_adapters(student) -> None:
    """Non-zero lora_B too (peft starts it at 0), so lora_A gets a gradient and a mis-sliced B shows."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in (p for p in student.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _read_adapter(directory: Path) -> dict:
    from flashmorph.io import atomic as io_atomic
    from flashmorph.training.lora import ADAPTER_WEIGHTS

    return {"tensors": io_atomic.load_safetensors_verified(directory / ADAPTER_WEIGHTS),
            "config": (directory / "adapter_config.json").read_text()}


def lora_reference(root: Path) -> dict:
    """TP=1, as the distill stage exports it: adapters saved from zero.gather_state_dict, then merged."""
    from flashmorph.parallel import zero
    from flashmorph.training import lora

    student = _lora_student()
    _random_adapters(student)
    lora.save_adapter(student, zero.gather_state_dict(student, keep=True), root / "initial")
    initial = {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}
    loss, grads = _distill_step(student)
    state = zero.gather_state_dict(student, keep=True)
    lora.save_adapter(student, state, root / "trained")
    return {"loss": loss, "grads": grads, "initial": initial, "adapter": _read_adapter(root / "trained"),
            "merged": lora.merge_lora_state(state, LORA_ALPHA / LORA_RANK)}


def lora_tensor_parallel(mesh) -> dict:
    """The TP twin of lora_reference on this rank's TP pair: TP=1 adapters loaded (sliced), one step, gathered."""
    from flashmorph.parallel.lora_tp import gather_lora_model_state, lora_tp_rule
    from flashmorph.parallel.tensor import gather_tensor_parallel
    from flashmorph.training import lora

    with tempfile.TemporaryDirectory(prefix="flashmorph-lora-tp-") as tmp:
        root = Path(tmp)
        reference = lora_reference(root)  # also writes the TP=1 adapter file this rank loads
        student = _lora_student(mesh)
        lora.load_adapter(student, root / "initial", tensor_parallel=True)
        local_shapes = {name: tuple(p.shape) for name, p in student.named_parameters() if p.requires_grad}
        module_types = sorted({type(m).__name__ for m in student.modules() if hasattr(m, "lora_A")})
        loss, grads = _distill_step(student)
        grads = {name: gather_tensor_parallel(name, grad, mesh, lora_tp_rule(name)) for name, grad in grads.items()}
        state = gather_lora_model_state(student, mesh)
        lora.save_adapter(student, state, root / "tp")
        adapter = _read_adapter(root / "tp")
        zero_run = _lora_zero(mesh, root / "initial")
    fresh = _fresh_tp_adapters(mesh)
    return {"reference": reference, "loss": loss, "grads": grads, "adapter": adapter, "local_shapes": local_shapes,
            "module_types": module_types, "merged": lora.merge_lora_state(state, LORA_ALPHA / LORA_RANK),
            "fresh": fresh, "zero": zero_run}


def _lora_zero(mesh, initial: Path) -> dict:
    """The distill stage's engine: ZeRO-3 over the mesh on the TP student's adapters (both DP replicas on the same
    rows, so the DP average is one replica's gradient); the first gradient, and the adapters gathered after a step
    (ZeRO-3 partitions, then TP slices)."""
    from deepspeed.utils import safe_get_full_grad

    from flashmorph.parallel import zero
    from flashmorph.parallel.lora_tp import gather_lora_model_state, lora_tp_rule
    from flashmorph.parallel.tensor import gather_tensor_parallel
    from flashmorph.training import lora
    from flashmorph.training.distill_model import DistillModel

    student = _lora_student(mesh)
    lora.load_adapter(student, initial, tensor_parallel=True)
    adapters = {name: p for name, p in student.named_parameters() if p.requires_grad}
    config = zero.build_ds_config(micro_batch_size=2, grad_accum_steps=1, world_size=mesh.dp_size, dtype="float32",
                                  zero_stage=3, lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    engine = zero.initialize_engine(DistillModel(student, None, **DISTILL), list(adapters.values()), config,
                                    mpu=mesh.mpu)
    batch = _distill_batch()
    sums = engine(batch["input_ids"], batch["position_ids"], batch["shift_labels"])
    engine.backward(sums["loss_sum"])
    grads = {name: gather_tensor_parallel(name, safe_get_full_grad(p).detach().clone(), mesh, lora_tp_rule(name))
             for name, p in adapters.items()}
    engine.step()
    state = gather_lora_model_state(student, mesh)
    out = {"loss": sums["loss_sum"].item(), "grads": grads, "norm": float(engine.get_global_grad_norm()),
           "adapters": {name: state[name] for name in adapters}}
    engine.destroy()
    return out


def _fresh_tp_adapters(mesh) -> dict:
    """A fresh TP=2 init, gathered: merge_from_tp refuses whole adapters that differ between the TP ranks."""
    from flashmorph.parallel.lora_tp import gather_lora_model_state

    torch.manual_seed(5)
    student = _lora_student(mesh)
    state = gather_lora_model_state(student, mesh)
    return {name: tensor for name, tensor in state.items() if ".lora_" in name}


# ------------------------------------------------------------------------------------------------ gate search


def gate_batch() -> dict:
    """The global batch: answers on the second half of each row, one ignored answer inside it."""
    ids = _ids(GATE_ROWS, 16)
    labels = ids.clone()
    labels[:, :8] = -100
    labels[1, 12] = -100
    return {"input_ids": ids, "labels": labels}


def _morphable(granularity: str):
    from flashmorph.model.config import MorphConfig
    from flashmorph.training.losses.retrieval import RetrievalLossModel

    model = RetrievalLossModel(_tiny(), MorphConfig(gate_granularity=granularity))
    logits = model.gates.gate_logits  # [layers] or [layers, heads]
    with torch.no_grad():  # distinct gates per layer and head, so a gradient landing on the wrong one shows
        logits.copy_(torch.linspace(1.5, -0.5, logits.numel()).view_as(logits))
    return model


def gate_reference(granularity: str) -> dict:
    """One process, plain AdamW on the whole batch: the stage's loss (mean answer CE + lambda x regularizer)."""
    from flashmorph.training.losses.retrieval import regularizer

    model = _morphable(granularity)
    optimizer = torch.optim.AdamW(model.gates.parameters(), lr=GATE_LR, weight_decay=0.0)
    batch = gate_batch()
    losses, gates, first_grad = [], [], None
    for _ in range(GATE_STEPS):
        out = model(batch["input_ids"], labels=batch["labels"])
        loss = out["loss_sum"] / out["num_tokens"] + REG_WEIGHT * regularizer(out["gate_values"], "mean", 0.5)
        loss.backward()
        if first_grad is None:
            first_grad = model.gates.gate_logits.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        gates.append(model.gates.gate_logits.detach().clone())
    return {"losses": losses, "gates": gates, "first_grad": first_grad}


def gate_search_zero(mesh, granularity: str) -> dict:
    """gate_reference under ZeRO-3 over `mesh`, wired as the gate-search stage should be (see gate_parallel)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from flashmorph.parallel import zero
    from flashmorph.parallel.gate_parallel import answer_loss_scale, local_gate_batch, parallelize_gate_search
    from flashmorph.training.losses.retrieval import regularizer

    micro = GATE_ROWS // mesh.dp_size
    model = parallelize_gate_search(_morphable(granularity), mesh, micro_batch_size=micro)
    config = zero.build_ds_config(micro_batch_size=micro, grad_accum_steps=1, world_size=mesh.dp_size,
                                  dtype="float32", zero_stage=3, lr=GATE_LR, weight_decay=0.0, grad_clip=0.0)
    engine = zero.initialize_engine(model, list(model.gates.parameters()), config, mpu=mesh.mpu)
    rows = {key: value.chunk(mesh.dp_size)[mesh.dp_rank] for key, value in gate_batch().items()}
    local = local_gate_batch(rows, mesh, torch.device("cpu"))
    losses, gates, first_grad = [], [], None
    for _ in range(GATE_STEPS):
        scale = answer_loss_scale(int((local["shift_labels"] != -100).sum()), mesh, 1, torch.device("cpu"))
        out = engine(local["input_ids"], position_ids=local["position_ids"], shift_labels=local["shift_labels"])
        reg = regularizer(out["gate_values"], "mean", 0.5)
        engine.backward(out["loss_sum"] * scale + REG_WEIGHT * reg)
        if first_grad is None:
            first_grad = safe_get_full_grad(model.gates.gate_logits).detach().clone()
        engine.step()
        sums = torch.stack([out["loss_sum"].detach(), out["num_tokens"].float()])
        dist.all_reduce(sums, group=mesh.sdp_group)  # TP ranks hold the same tokens
        losses.append((sums[0] / sums[1] + REG_WEIGHT * reg).item())
        gates.append(zero.full_state(model.gates)["gate_logits"])
    engine.destroy()
    return {"losses": losses, "gates": gates, "first_grad": first_grad,
            "coords": (mesh.tp_rank, mesh.sp_rank, mesh.dp_rank)}


# ------------------------------------------------------------------------------------------------ in the ranks

GATE_MESHES = {"tp2_dp2": (2, 1), "tp2_sp2": (2, 2), "sp2_dp2": (1, 2)}  # name: (TP, SP) of the 4-rank world
# (mesh, gate granularity); per-head gates cannot run under TP yet (apply_tensor_parallel refuses them)
GATE_CASES = (("tp2_dp2", "layer"), ("tp2_sp2", "layer"), ("sp2_dp2", "layer"), ("sp2_dp2", "head"))


def run_phases(info) -> dict:
    """Every phase on this rank, each on its own mesh; a failure is reported under its key, never hides the rest."""
    import functools
    import traceback

    from flashmorph.parallel.layout import resolve_layout
    from flashmorph.parallel.mesh import destroy_mesh, init_mesh

    out = {}
    for name, (tp, sp) in GATE_MESHES.items():
        mesh = init_mesh(resolve_layout(tp, sp, info.world_size))
        try:
            phases = {f"gates_{name}_{kind}": functools.partial(gate_search_zero, granularity=kind)
                      for case, kind in GATE_CASES if case == name}
            if name == "tp2_dp2":
                phases["lora_tp2_dp2"] = lora_tensor_parallel
            for key, fn in phases.items():
                try:
                    out[key] = fn(mesh)
                except Exception:
                    out[key] = {"crash": traceback.format_exc()}
        finally:
            destroy_mesh()
    return out
