"""Sharded load (flashmorph.parallel.sharded_load) on one 4-rank gloo world: the model is built on meta and each
rank reads only its TP slices, under TP=4, 2 and 1 in turn. Logits equal the plain single-process load (also after
a hybrid layout is applied to the loaded model), and each rank's memory is its shard (1/TP of the projections, plus
the replicated embedding, lm_head and norms) plus one tensor in flight."""

import pytest
import torch
from helpers.multiproc import run_distributed
from sharded_world import HYBRID, TP_DEGREES, batch, mini_70b_config, model_config, sharded_ranks, write_model

from flashmorph.model.hybrid import apply_hybrid_layout
from flashmorph.model.load import load_causal_lm
from flashmorph.model.shape import ModelShape
from flashmorph.parallel.dry_run import rank_params

HIDDEN, VOCAB = 512, 2048  # 71 MiB of fp32 weights: large against RSS noise (a few MiB), small for CI
SLACK = 12 * 2**20  # allocator and interpreter noise of one load (measured: under 5 MiB beside the shard)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("sharded_llama")
    total = write_model(model_dir, model_config(HIDDEN, VOCAB))
    reference = load_causal_lm(model_dir, "float32")
    with torch.no_grad():
        logits = reference(input_ids=batch(VOCAB), use_cache=False).logits
        hybrid_logits = apply_hybrid_layout(reference, HYBRID)(input_ids=batch(VOCAB), use_cache=False).logits
    mini_dir = tmp_path_factory.mktemp("mini_70b")
    write_model(mini_dir, mini_70b_config())
    return {"ranks": run_distributed(sharded_ranks, 4, str(model_dir), VOCAB, False, str(mini_dir)),
            "total_bytes": total,
            "ref_logits": logits, "ref_hybrid_logits": hybrid_logits,
            "ref_inv_freq": reference.model.rotary_emb.inv_freq}


@pytest.mark.parametrize("tp", TP_DEGREES)
def test_sharded_load_matches_single_process(world, tp):
    for rank, out in enumerate(world["ranks"]):
        got = out[tp]
        assert got["on_meta"] == [], (tp, rank)
        assert got["q_rows"] == 512 // tp, "each rank holds 8 / TP query heads of width 64"
        assert got["tied"] is False and torch.equal(got["inv_freq"], world["ref_inv_freq"])
        if tp == 1:  # no split, no swapped layers: the very same arithmetic
            assert torch.equal(got["logits"], world["ref_logits"]), rank
        else:  # row-parallel partial sums are all-reduced: only the summation order differs (measured 3e-6)
            assert got["tp_tagged"] is True, "megatron's TP tags must survive the load (DeepSpeed's grad norm)"
            torch.testing.assert_close(got["logits"], world["ref_logits"], atol=2e-5, rtol=1e-5)
        # the linear branch must differ from softmax, or the hybrid comparison would prove nothing
        assert not torch.allclose(world["ref_hybrid_logits"], world["ref_logits"], atol=1e-3)
        torch.testing.assert_close(got["hybrid_logits"], world["ref_hybrid_logits"], atol=2e-5, rtol=1e-5,
                                   msg=f"hybrid after a TP={tp} sharded load, rank {rank}")


def test_sharded_load_memory_scales_with_one_over_tp(world):
    config = model_config(HIDDEN, VOCAB)
    # the largest tensor read whole before its slice is copied out: down_proj (or the embedding, read whole)
    largest = 4 * max(config.intermediate_size * HIDDEN, VOCAB * HIDDEN)
    peaks = {tp: max(out[tp]["peak_bytes"] for out in world["ranks"]) for tp in TP_DEGREES}
    for tp in TP_DEGREES:
        shard = world["ranks"][0][tp]["param_bytes"]
        # the dry run's per-rank count (meta build + TP rules, no weights) is what the loaded rank holds
        assert rank_params(ModelShape.from_config(config), tp).per_tp_rank * 4 == shard, tp
        if tp == 1:
            assert shard == world["total_bytes"]
        # the measurement sees the load (every weight is touched by the forward) and nothing beyond one tensor
        assert 0.9 * shard < peaks[tp] < shard + largest + SLACK, (tp, shard, peaks[tp])
    assert peaks[4] < 0.5 * peaks[1], peaks
    assert peaks[2] < 0.75 * peaks[1], peaks


def test_materialize_in_one_process_and_refusals(tmp_path):
    """No process group needed at TP=1: the meta build filled from the files equals the saved model exactly; weights
    of another model, or a split the model does not hold, are refused with one line."""
    from flashmorph.errors import CheckpointError
    from flashmorph.model.tiny import build_tiny_model, tiny_config
    from flashmorph.parallel.sharded_load import build_empty_causal_lm, materialize_from_safetensors

    config = tiny_config("qwen3", num_layers=2, vocab_size=64)
    saved = build_tiny_model(config)
    saved.save_pretrained(tmp_path / "qwen3")
    lm = build_empty_causal_lm(config, torch.float32)
    materialize_from_safetensors(lm, tmp_path / "qwen3", tp=1, tp_rank=0)
    assert lm.state_dict().keys() == saved.state_dict().keys()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(lm.state_dict()[name], tensor), name
    with pytest.raises(CheckpointError, match="lacks the weight model.layers.0.self_attn.q_proj.bias"):
        materialize_from_safetensors(build_empty_causal_lm(tiny_config("qwen2", num_layers=2), torch.float32),
                                     tmp_path / "qwen3", tp=1, tp_rank=0)
    with pytest.raises(CheckpointError, match="gives TP rank 0 of 2 a \\[32, 64\\] piece, the model holds"):
        materialize_from_safetensors(build_empty_causal_lm(config, torch.float32), tmp_path / "qwen3", tp=2,
                                     tp_rank=0)


def test_a_70b_shaped_model_loads_sharded_and_trains_under_tp4_like_one_process(world):
    """Llama-3-70B's 64 query / 8 kv heads (at head_dim 4, 2 layers): built on meta, each rank reads its slices,
    then forward, backward and an AdamW step on every weight; a rank holds 1/TP of the decoder projections."""
    shape = ModelShape.from_config(mini_70b_config())
    assert (shape.num_heads, shape.num_kv_heads) == (64, 8)
    for rank, out in enumerate(world["ranks"]):
        tp4, tp1 = out["mini_70b"][4], out["mini_70b"][1]
        assert tp4["on_meta"] == [] and tp4["q_rows"] == 64 * 4 // 4, rank  # 16 of 64 heads, head_dim 4
        assert tp4["projection_params"] * 4 == tp1["projection_params"], rank
        assert tp4["param_bytes"] == rank_params(shape, 4).per_tp_rank * 4, rank
        before4, after4 = tp4["loss"]
        before1, after1 = tp1["loss"]
        assert after1 < before1  # the step trained, so equal losses after it test the TP=4 gradients
        assert abs(before4 - before1) < 1e-5 and abs(after4 - after1) < 1e-5, (rank, tp4["loss"], tp1["loss"])
