"""Tensor parallelism on 4 gloo ranks (tp_world.py runs them). Laid out TP=2 x DP=2: every TP pair reproduces the
unsplit model for a plain Llama, a hybrid, Qwen2 (qkv bias) and weights read from TP shard files, and ZeRO-3 over
the mesh trains like one process on the same global batch. Laid out TP=2 x SP=2: a hybrid under TP and Ulysses SP
reproduces the unsplit model."""

import pytest
import torch
from tp_world import BATCH, TP_CASES, four_rank_world, reference_training

# fp32 everywhere; TP only changes the summation order (row-parallel partial sums are all-reduced): measured max
# differences are 2e-7 (logits) and 5e-8 (gradients); with SP too, 1.4e-6 on gradients of a 126 summed loss
TOL = dict(atol=1e-5, rtol=1e-4)
# Adam normalises every element's step (m / sqrt(v)), so an element whose gradient is ~0 turns rounding into up to
# a ~3e-5 weight difference after 3 steps of lr 2e-2 (measured); a wrong update would be off by ~lr
WEIGHT_TOL = dict(atol=2e-4, rtol=0.0)


@pytest.fixture(scope="module")
def ranks():
    return [out["tp_dp"] for out in four_rank_world()]


@pytest.mark.parametrize("case", TP_CASES)
def test_tp2_matches_unsplit_model(ranks, case):
    for rank, out in enumerate(ranks):
        got = out[case]
        assert got["proj_types"] == ("HFColumnParallelLinear", "HFRowParallelLinear")
        # half of the 4 query heads and of the 2 kv heads (head_dim 16) per rank; the GQA ratio is unchanged
        assert (got["local_q_rows"], got["local_kv_rows"], got["kv_groups"]) == (32, 16, 2)
        assert got["keys_match"], "a TP rank's state dict must keep the HF keys"
        torch.testing.assert_close(got["tp_logits"], got["ref_logits"], **TOL, msg=f"{case} logits, rank {rank}")
        assert abs(got["tp_loss"] - got["ref_loss"]) < 1e-5, (case, rank, got["tp_loss"], got["ref_loss"])
        assert set(got["tp_grads"]) == set(got["ref_grads"])
        for name, grad in got["ref_grads"].items():
            assert grad is not None and grad.abs().sum() > 0, name
            torch.testing.assert_close(got["tp_grads"][name], grad, **TOL, msg=f"{case} grad {name}, rank {rank}")


def test_apply_tensor_parallel_refusals(ranks):
    errors = ranks[0]["errors"]
    assert errors["twice"] == "FlashMorphError: apply_tensor_parallel was already applied to this model"
    assert errors["head_gates"].startswith("ConfigError: morph.gate_granularity=head cannot run with "
                                           "parallel.tensor_parallel=2")
    # Qwen2 has q/k/v biases that Llama shards lack
    assert errors["other_model"].startswith("CheckpointError: the TP shards in") and "self_attn.k_proj.bias" in \
        errors["other_model"] and "written for another model" in errors["other_model"]


def test_tp2_dp2_coordinates(ranks):
    assert [out["coords"] for out in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]  # (tp_rank, dp_rank): TP innermost
    assert [out["sdp_ranks"] for out in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_zero3_tp2_dp2_trains_like_one_process(ranks):
    reference = reference_training()
    expected = reference["losses"]
    assert abs(expected[-1] - expected[0]) > 1e-2, "the steps must move the loss, or the comparison proves nothing"
    for rank, out in enumerate(ranks):
        zero = out["zero"]
        # DeepSpeed took the mesh: ZeRO shards each TP slice over the 2 DP ranks that hold that slice
        assert zero["partition_ranks"] == out["sdp_ranks"]
        assert (zero["dp_world_size"], zero["mp_world_size"], zero["train_batch_size"]) == (2, 2, BATCH)
        assert zero["losses"] == pytest.approx(expected, abs=1e-5), rank
        # Adam hides a wrong gradient scale, so compare the DP-averaged gradients and DeepSpeed's global norm (which
        # sums over TP ranks only for weights tagged tensor-parallel) directly
        for name, grad in reference["first_grads"].items():
            torch.testing.assert_close(zero["first_grads"][name], grad, **TOL, msg=f"grad {name}, rank {rank}")
        assert zero["norms"] == pytest.approx(reference["norms"], rel=1e-4), rank
        for name, weight in reference["weights"].items():
            torch.testing.assert_close(zero["weights"][name], weight, **WEIGHT_TOL, msg=f"weight {name}, rank {rank}")


def test_tp2_sp2_hybrid_matches_unsplit_model():
    """TP composed with Ulysses SP (flashmorph.parallel.sequence) on the TP=2 x SP=2 mesh: every rank holds half
    the heads of half the sequence, and still reproduces the unsplit hybrid."""
    for rank, out in enumerate(four_rank_world()):
        got = out["tp_sp"].get("compose") or out["tp_sp"]
        assert "crash" not in got, got["crash"]
        torch.testing.assert_close(got["logits"], got["ref_logits"], **TOL, msg=f"logits, rank {rank}")
        assert got["loss"] == pytest.approx(got["ref_loss"], rel=1e-5), rank
        assert set(got["grads"]) == set(got["ref_grads"])
        for name, grad in got["ref_grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, **TOL, msg=f"grad {name}, rank {rank}")
