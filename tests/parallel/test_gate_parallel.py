"""Gate search under TP and Ulysses SP (parallel/gate_parallel.py) on tp_world's 4 ranks: ZeRO-3 over a TP=2 x DP=2,
a TP=2 x SP=2 and an SP=2 x DP=2 mesh (layer gates; head gates on the last), each rank on its share of the batch,
gives one process's loss (mean answer CE + lambda x regularizer), gate gradient and gates after a few AdamW steps
on the whole batch."""

import pytest
import torch
from lora_gate_phases import GATE_CASES, GATE_MESHES, GATE_STEPS, gate_reference
from tp_world import four_rank_world

# fp32; only the summation order differs (TP all-reduces, SP splits the tokens): measured loss within 5e-7, the
# first gate gradient within 4e-9, the gates after 3 steps identical
LOSS_TOL = dict(abs=1e-5)
GRAD_TOL = dict(atol=1e-6, rtol=1e-5)
# Adam normalises every step (m / sqrt(v)), so tiny gradient differences could move a gate by up to ~lr x 1e-3;
# a wrong gradient would move it by ~lr (5e-2) per step
GATE_TOL = dict(atol=1e-4, rtol=0.0)


@pytest.fixture(scope="module")
def references():
    return {kind: gate_reference(kind) for kind in {kind for _, kind in GATE_CASES}}


@pytest.mark.parametrize(("mesh", "granularity"), GATE_CASES, ids=[f"{m}-{k}" for m, k in GATE_CASES])
def test_gate_search_matches_one_process(references, mesh, granularity):
    reference = references[granularity]
    expected = reference["losses"]
    assert abs(expected[-1] - expected[0]) > 1e-3, "the steps must move the loss, or the comparison proves nothing"
    # the regularizer's share and each layer's own gradient: a gate gradient summed over TP twice, or a
    # regularizer scaled by the ranks, would be off by far more than GRAD_TOL
    assert reference["first_grad"].abs().min() > 1e-3
    coords = set()
    for rank, out in enumerate(four_rank_world()):
        got = out["lora_gates"][f"gates_{mesh}_{granularity}"]
        assert "crash" not in got, got["crash"]
        coords.add(got["coords"])
        assert got["losses"] == pytest.approx(expected, **LOSS_TOL), (mesh, rank)
        torch.testing.assert_close(got["first_grad"], reference["first_grad"], **GRAD_TOL,
                                   msg=lambda m: f"{mesh} rank {rank}: {m}")
        assert len(got["gates"]) == GATE_STEPS
        for step, (gates, want) in enumerate(zip(got["gates"], reference["gates"])):
            torch.testing.assert_close(gates, want, **GATE_TOL, msg=lambda m: f"{mesh} rank {rank} step {step}: {m}")
    tp, sp = GATE_MESHES[mesh]
    assert len(coords) == 4 and {c[0] for c in coords} == set(range(tp)) and {c[1] for c in coords} == set(range(sp))


def test_parallelize_gate_search_takes_a_morphable_model(tiny_lm):
    from flashmorph.errors import FlashMorphError
    from flashmorph.parallel.gate_parallel import parallelize_gate_search

    with pytest.raises(FlashMorphError, match="parallelize_gate_search takes a MorphableLM, got LlamaForCausalLM"):
        parallelize_gate_search(tiny_lm(), mesh=None, micro_batch_size=1)
