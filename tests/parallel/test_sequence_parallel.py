"""Ulysses sequence parallelism: SP=2 and SP=4 gloo ranks give one process's summed loss and gradients, for a
morphable model (layer and head gates, with and without activation checkpointing) and for a hybrid."""

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers.multiproc import run_distributed

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.model.config import MorphConfig
from flashmorph.model.hybrid import apply_hybrid_layout
from flashmorph.model.morph import morph_model
from flashmorph.model.tiny import build_tiny_model, tiny_config
from flashmorph.parallel.sequence import check_sequence_parallel, shard_sequence
from flashmorph.training.losses.retrieval import RetrievalLossModel

SEQ_LEN, BATCH = 32, 2  # tiny Llama: 4 layers, hidden 64, 4 heads, 2 kv heads, vocab 64, fp32
HYBRID_LAYOUT = ["full", "linear", "linear", "full"]
HYBRID_TRAINABLE = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "o")]
SCENARIOS = ("layer_gates", "head_gates", "checkpointed", "hybrid")
# fp32; ranks run the same ops on fewer heads or tokens, so only summation order differs. Measured (SP=2, SP=4):
# loss (~220) within 1.5e-5 (one ulp), gate grads (max ~0.18) within 6e-8, hybrid weight grads (max ~2.6) within 1e-6
LOSS_TOL = dict(rtol=1e-6, atol=1e-4)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def _batch():
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 64, (BATCH, SEQ_LEN), generator=gen)
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt without loss, and one ignored target inside a shard
    labels[0, 20] = -100
    return input_ids, labels


def _build(scenario):
    """(the model to call, its HF model) with the same weights on every rank and in the reference."""
    lm = build_tiny_model(tiny_config("llama"), seed=0).train()
    if scenario == "hybrid":
        apply_hybrid_layout(lm, HYBRID_LAYOUT)
        for name, param in lm.named_parameters():
            param.requires_grad_(name in HYBRID_TRAINABLE)
        return lm, lm
    model = RetrievalLossModel(lm, MorphConfig(gate_granularity="head" if scenario == "head_gates" else "layer"))
    with torch.no_grad():  # distinct gates per layer and head, so a wrongly sliced head gate shows
        logits = model.gates.gate_logits
        logits.copy_(torch.linspace(-2.0, 2.0, logits.numel()).view_as(logits))
    if scenario == "checkpointed":
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, lm


def _loss(model, scenario, input_ids, position_ids=None, labels=None, shift_labels=None):
    if scenario != "hybrid":
        return model(input_ids, labels=labels, position_ids=position_ids, shift_labels=shift_labels)["loss_sum"]
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden).float()  # [B, T, vocab]
    return F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100, reduction="sum")


def _grads(model, scenario):
    if scenario != "hybrid":
        return {"gate_logits": model.gates.gate_logits.grad.clone()}
    params = dict(model.named_parameters())
    return {name: params[name].grad.clone() for name in HYBRID_TRAINABLE}


@pytest.fixture(scope="module")
def reference():
    """SP=1 in this process: whole sequences, labels shifted by the model, no position ids, no SP installed."""
    input_ids, labels = _batch()
    out = {}
    for scenario in SCENARIOS:
        model, _ = _build(scenario)
        loss = _loss(model, scenario, input_ids, labels=labels)
        loss.backward()
        out[scenario] = {"loss": loss.detach(), "grads": _grads(model, scenario)}
    return out


def _sp_worker(info):
    import torch.distributed as dist

    import flashmorph.model.morph as morph_module
    from flashmorph.parallel.sequence import (install_sequence_parallel, is_sequence_parallel,
                                              uninstall_sequence_parallel)

    seen_positions = []  # position ids the linear branch undoes RoPE with
    linear_branch = morph_module._linear_branch

    def recording_linear_branch(module, spec, query, key, value, position_ids, state_layer=None):
        seen_positions.append(position_ids.clone())
        return linear_branch(module, spec, query, key, value, position_ids, state_layer)

    morph_module._linear_branch = recording_linear_branch

    def all_sum(tensor, group):
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    def run(scenario, group):
        sp_rank, sp_size = dist.get_rank(group), dist.get_world_size(group)
        shard = shard_sequence(*_batch(), sp_rank, sp_size)
        model, lm = _build(scenario)
        install_sequence_parallel(model, group, micro_batch_size=BATCH)
        install_sequence_parallel(model, group, micro_batch_size=BATCH)  # idempotent: replaces, never stacks
        seen_positions.clear()
        loss = _loss(model, scenario, shard["input_ids"], shard["position_ids"], shift_labels=shard["shift_labels"])
        loss.backward()
        global_positions = torch.arange(SEQ_LEN).expand(BATCH, -1)
        return model, lm, {
            "loss": all_sum(loss, group),
            "grads": {name: all_sum(grad, group) for name, grad in _grads(model, scenario).items()},
            "linear_calls": len(seen_positions),
            "positions_global": all(torch.equal(p, global_positions) for p in seen_positions),
            "installed": is_sequence_parallel(model) and lm.config._attn_implementation == "morph_sp",
        }

    world = dist.new_group(list(range(info.world_size)))
    results = {}
    for scenario in SCENARIOS:
        model, lm, results[scenario] = run(scenario, world)
    try:  # a forward without global positions is refused before any collective runs
        lm.get_decoder()(input_ids=torch.zeros(BATCH, SEQ_LEN // info.world_size, dtype=torch.long), use_cache=False)
        results["missing_positions"] = "no error"
    except FlashMorphError as err:
        results["missing_positions"] = str(err)

    # uninstall: whole sequences run on one rank again (ALST rewrote num_key_value_groups at SP=4)
    model, lm, _ = run("layer_gates", world)
    uninstall_sequence_parallel(model)
    input_ids, labels = _batch()
    results["after_uninstall"] = {
        "loss": _loss(model, "layer_gates", input_ids, labels=labels).detach(),
        "installed": is_sequence_parallel(model) or lm.config._attn_implementation != "morph",
    }

    # SP groups smaller than the world (as next to DP/TP groups): every rank creates every group, joins its own
    if info.world_size == 4:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        _, _, results["sp2_of_4"] = run("head_gates", groups[info.rank // 2])
    return results


@functools.cache
def sp_results(sp_size: int) -> list[dict]:
    """Every scenario on `sp_size` gloo ranks (the SP group = all ranks), one spawn per SP size; per-rank results."""
    return run_distributed(_sp_worker, sp_size)


def _assert_matches(got, want):
    torch.testing.assert_close(got["loss"], want["loss"], **LOSS_TOL)
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert grad.abs().max() > 0, f"{name} got no gradient in the reference"
        torch.testing.assert_close(got["grads"][name], grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("sp_size", [2, 4])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sequence_parallel_matches_one_process(reference, scenario, sp_size):
    ranks = sp_results(sp_size)
    for rank_results in ranks:
        got = rank_results[scenario]
        assert got["installed"]
        _assert_matches(got, reference[scenario])
        # the linear branch undid RoPE with the global positions that ALST all-gathered, in every call
        assert got["positions_global"] and got["linear_calls"] > 0
    calls = {name: ranks[0][name]["linear_calls"] for name in SCENARIOS}
    # one call per mixed/linear layer; activation checkpointing recomputes each (all-to-all included) in backward
    assert calls == {"layer_gates": 4, "head_gates": 4, "checkpointed": 8, "hybrid": 2}


@pytest.mark.parametrize("sp_size", [2, 4])
def test_forward_without_positions_is_refused(sp_size):
    ranks = sp_results(sp_size)
    assert all("position_ids" in r["missing_positions"] for r in ranks), ranks[0]["missing_positions"]


@pytest.mark.parametrize("sp_size", [2, 4])
def test_uninstall_restores_whole_sequence_forward(reference, sp_size):
    ranks = sp_results(sp_size)
    for rank_results in ranks:
        assert not rank_results["after_uninstall"]["installed"]
        after = rank_results["after_uninstall"]["loss"]
        torch.testing.assert_close(after, reference["layer_gates"]["loss"], **LOSS_TOL)


def test_sp_groups_smaller_than_the_world(reference):
    # 4 ranks as two SP=2 groups (DP=2 x SP=2), per-head gates: each group reproduces the reference on its own
    for rank_results in sp_results(4):
        _assert_matches(rank_results["sp2_of_4"], reference["head_gates"])


# ---------------------------------------------------------------------------------------------
# in this process: sharding, shifted labels, checks (no process group, nothing installed)


def test_shard_sequence_gives_slices_global_positions_and_labels_shifted_before_slicing():
    input_ids, labels = _batch()
    shards = [shard_sequence(input_ids, labels, rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards], dim=1), input_ids)
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], dim=1), torch.arange(SEQ_LEN).expand(BATCH, -1))
    shift_labels = torch.cat([s["shift_labels"] for s in shards], dim=1)
    assert torch.equal(shift_labels[:, :-1], labels[:, 1:])
    assert (shift_labels[:, -1] == -100).all()
    # a shard's last target is the next shard's first token
    assert torch.equal(shards[1]["shift_labels"][:, -1], shards[2]["input_ids"][:, 0])
    assert set(shards[0]) == {"input_ids", "position_ids", "shift_labels"}
    assert set(shard_sequence(input_ids, None, 0, 2)) == {"input_ids", "position_ids"}


def test_shard_sequence_refuses_indivisible_length():
    input_ids, labels = _batch()
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=3 does not divide the sequence length"):
        shard_sequence(input_ids, labels, 0, 3)
    with pytest.raises(ConfigError, match="sp_rank"):
        shard_sequence(input_ids, labels, 4, 4)


def test_shift_labels_give_the_same_loss_as_labels():
    model, _ = _build("layer_gates")
    input_ids, labels = _batch()
    by_labels = model(input_ids, labels=labels)
    by_shift = model(input_ids, shift_labels=F.pad(labels[:, 1:], (0, 1), value=-100))
    assert torch.equal(by_labels["loss_sum"], by_shift["loss_sum"])
    assert by_labels["num_tokens"] == by_shift["num_tokens"] == int((labels[:, 1:] != -100).sum())
    with pytest.raises(FlashMorphError, match="one of them"):
        model(input_ids, labels=labels, shift_labels=labels)


def test_check_sequence_parallel_refuses_unsupported_shapes():
    morphed = morph_model(build_tiny_model(tiny_config("llama", num_heads=4, num_kv_heads=2)))
    check_sequence_parallel(morphed, 4)  # 2 kv heads, SP=4: ALST replicates each kv head twice
    with pytest.raises(ConfigError, match=r"does not divide the model's num_heads=4 \(4 attention heads per TP rank\)"):
        check_sequence_parallel(morphed, 3)
    gqa = morph_model(build_tiny_model(tiny_config("llama", hidden_size=96, num_heads=6, num_kv_heads=3)))
    with pytest.raises(ConfigError, match="must divide one another"):
        check_sequence_parallel(gqa, 2)
    eager = morph_model(build_tiny_model(tiny_config("llama")), MorphConfig(softmax_impl="eager"))
    with pytest.raises(ConfigError, match="softmax_impl=sdpa"):
        check_sequence_parallel(eager, 2)
    with pytest.raises(FlashMorphError, match="morph_model or apply_hybrid_layout"):
        check_sequence_parallel(build_tiny_model(tiny_config("llama")), 2)
