"""One 4-rank gloo world shared by test_tensor_parallel.py and test_mesh.py (run once per pytest process): process
start-up (torch + deepspeed imports on every rank), not the tiny models, is what costs time on 2 cores.

Phase 1, TP=2 x DP=2: every TP pair compares TP=2 with the unsplit model, then ZeRO-3 trains over the mesh.
Phase 2, TP=2 x SP=2: group memberships, the mpu DeepSpeed reads, where ZeRO partitions and reduces, and a hybrid
under TP and Ulysses SP at once.
Then lora_gate_phases.py: LoRA under TP, and gate search under TP, SP and both (its own meshes).
"""

import copy
import functools
import tempfile
import traceback
from pathlib import Path

import torch
from helpers.multiproc import run_distributed

from flashmorph.model.tiny import build_tiny_model, tiny_config

WORLD = 4
SHAPE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=64, intermediate_size=128)
BATCH, SEQ = 4, 16  # the global batch of the ZeRO run; DP rank d trains on rows [2d, 2d + 2)
LR, STEPS = 2e-2, 3
# a small trainable set mixing column-split (q_proj), row-split (o_proj) and TP-replicated (norm) weights
TRAINABLE = ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "input_layernorm.weight")
TP_CASES = ("llama", "hybrid", "qwen2", "shards_tp2", "shards_tp1")


def tiny(family: str = "llama", seed: int = 0):
    lm = build_tiny_model(tiny_config(family, **SHAPE), seed=seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        for name, param in lm.named_parameters():
            if name.endswith(".bias"):  # HF initialises biases at zero, which would hide a mis-sliced bias
                param.normal_(std=0.5)
    return lm


def batch(rows: int = 2) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (rows, SEQ), generator=torch.Generator().manual_seed(7))


def select_trainable(lm) -> list[str]:
    names = [name for name, _ in lm.named_parameters() if name.endswith(TRAINABLE)]
    for name, param in lm.named_parameters():
        param.requires_grad_(name in names)
    return names


# ------------------------------------------------------------------------------------------ phase 1: TP x DP


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as err:  # the parent checks the type name and message
        return f"{type(err).__name__}: {err}"
    return None


def _compare(mesh, family: str, hybrid=None, shards=None) -> dict:
    """TP=2 model vs the unsplit one (built identically on this rank); tensors for the parent to compare."""
    from flashmorph.model.hybrid import apply_hybrid_layout
    from flashmorph.parallel.tensor import apply_tensor_parallel, gather_tensor_parallel

    reference = tiny(family)
    # loaded from shards: start from other weights, so only a correct load can match
    split = tiny(family, seed=1) if shards else copy.deepcopy(reference)
    if hybrid:
        apply_hybrid_layout(reference, hybrid)
        apply_hybrid_layout(split, hybrid)
    apply_tensor_parallel(split, mesh, shards=shards)
    ids = batch()
    out = {}
    for key, lm in (("ref", reference), ("tp", split)):
        result = lm(input_ids=ids, labels=ids, use_cache=False)
        result.loss.backward()
        out[f"{key}_logits"], out[f"{key}_loss"] = result.logits.detach(), result.loss.item()
    out["ref_grads"] = {name: p.grad for name, p in reference.named_parameters()}
    out["tp_grads"] = {name: gather_tensor_parallel(name, p.grad, mesh) for name, p in split.named_parameters()}
    attn = split.model.layers[0].self_attn
    out["local_q_rows"] = attn.q_proj.weight.shape[0]
    out["local_kv_rows"] = attn.k_proj.weight.shape[0]
    out["kv_groups"] = attn.num_key_value_groups
    out["proj_types"] = (type(attn.q_proj).__name__, type(attn.o_proj).__name__)
    out["keys_match"] = sorted(split.state_dict()) == sorted(reference.state_dict())
    return out


def _tp_errors(mesh, shards: str) -> dict:
    from flashmorph.model.config import MorphConfig
    from flashmorph.model.morph import morph_model
    from flashmorph.parallel.tensor import apply_tensor_parallel

    done = apply_tensor_parallel(tiny(), mesh)
    head_gated = morph_model(tiny(), MorphConfig(gate_granularity="head"))
    return {"twice": _error(lambda: apply_tensor_parallel(done, mesh)),
            "head_gates": _error(lambda: apply_tensor_parallel(head_gated.lm, mesh)),
            "other_model": _error(lambda: apply_tensor_parallel(tiny("qwen2"), mesh, shards=shards))}


def _train_zero(mesh) -> dict:
    """STEPS optimizer steps of the trainable set under ZeRO-3 with the mesh's mpu; DP-averaged losses."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from flashmorph.parallel.tensor import apply_tensor_parallel, gather_tensor_parallel, gather_tensor_parallel_state
    from flashmorph.parallel.zero import build_ds_config, initialize_engine

    lm = tiny()
    names = select_trainable(lm)
    apply_tensor_parallel(lm, mesh)
    params = dict(lm.named_parameters())
    config = build_ds_config(micro_batch_size=BATCH // mesh.dp_size, grad_accum_steps=1, world_size=mesh.dp_size,
                             dtype="float32", zero_stage=3, lr=LR, weight_decay=0.0, grad_clip=0.0)
    engine = initialize_engine(lm, [params[n] for n in names], config, mpu=mesh.mpu)
    local = batch(BATCH).chunk(mesh.dp_size)[mesh.dp_rank]
    losses, norms, first_grads = [], [], {}
    for step in range(STEPS):
        loss = engine(input_ids=local, labels=local, use_cache=False).loss
        engine.backward(loss)
        if step == 0:
            first_grads = {n: gather_tensor_parallel(n, safe_get_full_grad(params[n]).detach().clone(), mesh)
                           for n in names}
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh.dp_group)
        losses.append(mean.item() / mesh.dp_size)
    state = gather_tensor_parallel_state(lm, mesh)
    out = {"losses": losses, "norms": norms, "first_grads": first_grads, "weights": {n: state[n] for n in names},
           "partition_ranks": sorted(dist.get_process_group_ranks(params[names[0]].ds_process_group)),
           "dp_world_size": engine.dp_world_size, "mp_world_size": engine.mp_world_size,
           "train_batch_size": engine.train_batch_size()}
    engine.destroy()
    return out


def _phase_tp_dp(info, shard_dirs: dict) -> dict:
    from flashmorph.parallel.layout import resolve_layout
    from flashmorph.parallel.mesh import destroy_mesh, init_mesh

    mesh = init_mesh(resolve_layout(2, 1, info.world_size))
    try:
        out = {"coords": (mesh.tp_rank, mesh.dp_rank), "sdp_ranks": list(mesh.sdp_ranks)}
        out["llama"] = _compare(mesh, "llama")
        out["hybrid"] = _compare(mesh, "llama", hybrid=["full", "linear"])
        out["qwen2"] = _compare(mesh, "qwen2")
        for key, directory in shard_dirs.items():
            out[key] = _compare(mesh, "llama", shards=directory)
        out["errors"] = _tp_errors(mesh, shard_dirs["shards_tp2"])
        out["zero"] = _train_zero(mesh)
        return out
    finally:
        destroy_mesh()


# ------------------------------------------------------------------------------------------ phase 2: TP x SP


def _phase_tp_sp(info) -> dict:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from flashmorph.parallel.layout import ParallelLayout, resolve_layout
    from flashmorph.parallel.mesh import destroy_mesh, init_mesh
    from flashmorph.parallel.zero import initialize_engine

    out = {"wrong_world": _error(lambda: init_mesh(ParallelLayout(2, 1, 1)))}
    mesh = init_mesh(resolve_layout(2, 2, info.world_size))
    try:
        out["twice"] = _error(lambda: init_mesh(mesh.layout))
        mpu = mesh.mpu
        out["ranks"] = {"tp": list(mesh.tp_ranks), "sp": list(mesh.sp_ranks), "dp": list(mesh.dp_ranks),
                        "sdp": list(mesh.sdp_ranks)}
        out["coords"] = (mesh.tp_rank, mesh.sp_rank, mesh.dp_rank)
        out["grad_divisor"] = mesh.grad_divisor
        out["group_sizes"] = {name: dist.get_world_size(group) for name, group in
                              (("tp", mesh.tp_group), ("sp", mesh.sp_group), ("dp", mesh.dp_group),
                               ("sdp", mesh.sdp_group))}
        out["mpu"] = {
            "tp": (mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank(),
                   mpu.get_tensor_model_parallel_src_rank()),
            "mp": (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()),
            "dp": (mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(),
                   mpu.get_data_parallel_group_ranks()),
            "sp": (mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()),
            "sdp": (mpu.get_sequence_data_parallel_world_size(), mpu.get_sequence_data_parallel_rank()),
            "has_initialize_sequence_parallel": hasattr(mpu, "initialize_sequence_parallel"),
        }
        # DeepSpeed over the mesh: a weight replicated on all ranks, each rank feeding its own input (as SP ranks
        # feed their sequence slices); ZeRO must partition over SP x DP and combine the SP ranks' gradients
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1, bias=False)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "steps_per_print": 10**9}
        engine = initialize_engine(model, list(model.parameters()), config, mpu=mpu)
        x = torch.full((1, 8), float(info.rank + 1))
        engine.backward(engine(x).sum())
        out["sp_grad"] = safe_get_full_grad(model.weight).detach().clone()
        out["engine"] = {"partition_ranks": sorted(dist.get_process_group_ranks(model.weight.ds_process_group)),
                         "seq_dp_ranks": sorted(dist.get_process_group_ranks(engine.seq_data_parallel_group)),
                         "dp_world_size": engine.dp_world_size, "seq_dp_world_size": engine.seq_dp_world_size,
                         "mp_world_size": engine.mp_world_size, "sp_size": engine.sequence_parallel_size,
                         "train_batch_size": engine.train_batch_size()}
        engine.destroy()
        try:
            out["compose"] = _compose_tp_sp(mesh)
        except Exception:  # sequence.py's failure must not hide the mesh results test_mesh checks
            out["compose"] = {"crash": traceback.format_exc()}
        return out
    finally:
        destroy_mesh()


def _compose_tp_sp(mesh) -> dict:
    """A hybrid under TP=2 and Ulysses SP=2 at once vs the unsplit model: this rank's logits, and the summed loss
    and gradients combined over SP (sum) and TP (gather)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from flashmorph.model.hybrid import apply_hybrid_layout
    from flashmorph.parallel.sequence import install_sequence_parallel, shard_sequence
    from flashmorph.parallel.tensor import apply_tensor_parallel, gather_tensor_parallel

    def loss_sum(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")

    reference, split = tiny(), tiny()
    for lm in (reference, split):
        apply_hybrid_layout(lm, ["full", "linear"])
    apply_tensor_parallel(split, mesh)
    install_sequence_parallel(split, mesh.sp_group, micro_batch_size=2)
    ids = batch()
    full = reference(input_ids=ids, use_cache=False).logits
    ref_loss = loss_sum(full[:, :-1], ids[:, 1:])
    ref_loss.backward()
    shard = shard_sequence(ids, ids, mesh.sp_rank, mesh.sp_size)
    local = split(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits
    local_loss = loss_sum(local, shard["shift_labels"])
    local_loss.backward()
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=mesh.sp_group)
    grads = {}
    for name, param in split.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=mesh.sp_group)
        grads[name] = gather_tensor_parallel(name, grad, mesh)
    width = ids.shape[1] // mesh.sp_size
    return {"logits": local.detach(), "ref_logits": full[:, mesh.sp_rank * width:(mesh.sp_rank + 1) * width].detach(),
            "loss": total.item(), "ref_loss": ref_loss.item(), "grads": grads,
            "ref_grads": {name: p.grad for name, p in reference.named_parameters()}}


def _rank_body(info, shard_dirs: dict) -> dict:
    from lora_gate_phases import run_phases

    out = {"tp_dp": _phase_tp_dp(info, shard_dirs)}
    try:
        out["tp_sp"] = _phase_tp_sp(info)
    except Exception:  # keep phase 1's results for test_tensor_parallel; test_mesh reports this failure
        out["tp_sp"] = {"crash": traceback.format_exc()}
    # LoRA under TP and gate search under TP / SP (test_lora_tensor_parallel.py, test_gate_parallel.py)
    out["lora_gates"] = run_phases(info)
    return out


# ------------------------------------------------------------------------------------------ in the parent


def reference_training() -> dict:
    """The ZeRO run's single-process twin: plain torch AdamW on the whole global batch."""
    lm = tiny()
    names = select_trainable(lm)
    params = dict(lm.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=LR, weight_decay=0.0)
    ids = batch(BATCH)
    losses, norms, first_grads = [], [], {}
    for step in range(STEPS):
        loss = lm(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if step == 0:
            first_grads = {n: params[n].grad.clone() for n in names}
        norms.append(torch.linalg.vector_norm(torch.stack([params[n].grad.norm() for n in names])).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "first_grads": first_grads,
            "weights": {n: params[n].detach().clone() for n in names}}


@functools.lru_cache(maxsize=None)
def four_rank_world() -> list[dict]:
    """Every rank's results of both phases; computed once per pytest process."""
    from flashmorph.checkpoint.reshard import reshard

    with tempfile.TemporaryDirectory(prefix="flashmorph-tp-") as tmp:
        root = Path(tmp)
        tiny().save_pretrained(root / "hf")
        shard_dirs = {}
        for tp in (2, 1):  # TP=2 shards are read as they are; TP=1 shards are re-cut for the TP=2 mesh
            reshard("hf", "tp", root / "hf", root / f"tp{tp}", tp=tp, show_progress=False)
            shard_dirs[f"shards_tp{tp}"] = str(root / f"tp{tp}")
        return run_distributed(_rank_body, WORLD, shard_dirs)
