"""LoRA under megatron TP (parallel/lora_tp.py) on tp_world's TP=2 x DP=2 mesh: TP=1 adapters sliced onto each TP
rank give one process's distill loss and adapter gradients; after an SGD step the adapters, gathered, save to the
TP=1 adapter files and merge to the TP=1 weights; a fresh TP init is whole-fan-in kaiming and agrees across TP."""

import json
import math

import pytest
import torch
from lora_gate_phases import LORA_TARGETS
from tp_world import four_rank_world

from flashmorph.errors import CheckpointError
from flashmorph.parallel import tp_rules
from flashmorph.parallel.lora_tp import lora_tp_rule

# fp32; TP changes only the summation order (row-parallel partial sums, all-reduced): measured max differences are
# 8e-6 on a loss of 63.5, 1.4e-6 on gradients (max ~1.5), 1e-6 on the adapters and merged weights after the step
LOSS_TOL = dict(rel=1e-6)
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def ranks():
    out = [rank["lora_gates"]["lora_tp2_dp2"] for rank in four_rank_world()]
    for got in out:
        assert "crash" not in got, got["crash"]
    return out


def test_adapters_wrap_megatron_layers_split_on_the_right_side(ranks):
    got = ranks[0]
    assert got["module_types"] == ["TensorParallelLoraLinear"]
    shapes = {name.split("layers.0.")[1]: shape for name, shape in got["local_shapes"].items() if "layers.0." in name}
    # column-parallel (q: 64 -> 64 rows, 32 per rank): lora_A whole, lora_B split by rows; row-parallel (o: 64
    # inputs, 32 per rank; down: 128 inputs): lora_A split by columns, lora_B whole. Rank r = 4.
    assert shapes["self_attn.q_proj.lora_A.default.weight"] == (4, 64)
    assert shapes["self_attn.q_proj.lora_B.default.weight"] == (32, 4)
    assert shapes["self_attn.v_proj.lora_B.default.weight"] == (16, 4)
    assert shapes["self_attn.o_proj.lora_A.default.weight"] == (4, 32)
    assert shapes["self_attn.o_proj.lora_B.default.weight"] == (64, 4)
    assert shapes["mlp.down_proj.lora_A.default.weight"] == (4, 64)
    assert shapes["mlp.up_proj.lora_B.default.weight"] == (64, 4)


def test_tp2_distill_loss_and_adapter_grads_match_one_process(ranks):
    for rank, got in enumerate(ranks):
        want = got["reference"]
        assert got["loss"] == pytest.approx(want["loss"], **LOSS_TOL), rank
        assert set(got["grads"]) == set(want["grads"]) and len(want["grads"]) == 2 * 2 * len(LORA_TARGETS)
        for name, grad in want["grads"].items():
            assert grad.abs().max() > 1e-3, f"{name} got no gradient in the reference"
            torch.testing.assert_close(got["grads"][name], grad, **TOL, msg=lambda m: f"{name}, rank {rank}: {m}")


def test_tp2_adapter_gathers_to_the_tp1_files_and_merges_like_tp1(ranks):
    for rank, got in enumerate(ranks):
        want = got["reference"]
        tensors, ref_tensors = got["adapter"]["tensors"], want["adapter"]["tensors"]
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in ref_tensors.items()}
        for name, tensor in ref_tensors.items():
            torch.testing.assert_close(tensors[name], tensor, **TOL, msg=lambda m: f"{name}, rank {rank}: {m}")
        assert json.loads(got["adapter"]["config"]) == json.loads(want["adapter"]["config"])
        assert set(got["merged"]) == set(want["merged"])
        for name, weight in want["merged"].items():
            torch.testing.assert_close(got["merged"][name], weight, **TOL, msg=lambda m: f"{name}, rank {rank}: {m}")


def test_fresh_tp_init_is_whole_fan_in_kaiming(ranks):
    fresh = ranks[0]["fresh"]  # gathered: the TP ranks' whole adapters agreed bit for bit
    assert len(fresh) == 2 * 2 * len(LORA_TARGETS)
    for name, tensor in fresh.items():
        if ".lora_B." in name:
            assert not tensor.any(), name  # peft's zero B: the student starts as the teacher
            continue
        # kaiming_uniform(a=sqrt(5)) draws from +-1/sqrt(fan_in); the split A of o/down_proj must use the whole
        # fan-in (64 / 128), not a rank's half, or its entries would reach sqrt(2) times further
        bound = 1 / math.sqrt(tensor.shape[1])
        assert 0.9 * bound < tensor.abs().max() <= bound, name


def test_lora_tp_rules():
    prefix = "base_model.model.model.layers.3."
    column, row = tp_rules.tp_rule("model.layers.3.self_attn.q_proj.weight"), tp_rules.tp_rule(
        "model.layers.3.mlp.down_proj.weight")
    assert lora_tp_rule(prefix + "self_attn.q_proj.lora_B.default.weight") == column
    assert lora_tp_rule(prefix + "self_attn.q_proj.lora_B.weight") == column  # peft's file names drop the adapter
    assert lora_tp_rule(prefix + "mlp.down_proj.lora_A.weight") == row
    assert lora_tp_rule(prefix + "self_attn.q_proj.lora_A.weight").split_dim is None
    assert lora_tp_rule(prefix + "mlp.down_proj.lora_B.default.weight").split_dim is None
    assert lora_tp_rule(prefix + "self_attn.q_proj.base_layer.weight") == column
    with pytest.raises(CheckpointError, match="no tensor-parallel rule"):
        lora_tp_rule(prefix + "self_attn.rotary.lora_A.weight")


def test_zero3_over_the_mesh_trains_tp_adapters_like_one_process(ranks):
    """The distill stage's engine (ZeRO-3, mesh mpu) around the TP student: same loss and adapter gradients, a grad
    norm that counts split adapters on every TP rank and whole ones once, and AdamW's first step on the adapters."""
    for rank, got in enumerate(ranks):
        want, zero = got["reference"], got["zero"]
        assert zero["loss"] == pytest.approx(want["loss"], **LOSS_TOL), rank
        assert set(zero["grads"]) == set(want["grads"])
        for name, grad in want["grads"].items():
            torch.testing.assert_close(zero["grads"][name], grad, **TOL, msg=lambda m: f"{name}, rank {rank}: {m}")
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want["grads"].values()])).item()
        assert zero["norm"] == pytest.approx(norm, rel=1e-4), rank
        for name, start in want["initial"].items():
            # AdamW's first step moves each entry by lr x g / (|g| + eps): lr (1e-2) times the gradient's sign
            grad = want["grads"][name]
            step = zero["adapters"][name] - start
            sure = grad.abs() > 1e-3  # where neither rounding nor eps (1e-8) moves the step
            torch.testing.assert_close(step[sure], -1e-2 * grad[sure].sign(), atol=1e-5, rtol=0.0,
                                       msg=lambda m: f"{name}, rank {rank}: {m}")
            assert step.abs().max() <= 1e-2 + 1e-6, name


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_adapter_init_broadcast_takes_host_tensors_on_any_backend(backend, monkeypatch):
    """peft draws the adapters on the host, before DeepSpeed moves the model: NCCL refuses host tensors, so there
    the broadcast goes through a device copy and lands back in the host tensor (the device is faked as the CPU)."""
    import deepspeed.accelerator
    import torch

    from flashmorph.parallel import lora_tp

    sent = []

    def fake_broadcast(tensor, src, group=None):
        sent.append(tensor)
        tensor.fill_(7.0)  # what TP rank 0 holds

    class FakeAccelerator:
        def current_device_name(self):
            return "cpu"

    monkeypatch.setattr(lora_tp.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(lora_tp.dist, "broadcast", fake_broadcast)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator())
    host = torch.zeros(2, 3)
    lora_tp.broadcast_host_tensor(host, 0, group=None)
    assert torch.equal(host, torch.full((2, 3), 7.0))
    assert (sent[0] is host) == (backend == "gloo")  # NCCL: a device copy travels, never the host tensor itself
