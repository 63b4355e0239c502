"""The morphed attention: exact softmax at g=1, exact Liger linear attention at g=0, gates-only training."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from flashmorph.model.config import MorphConfig
from flashmorph.model.ops.gla import gla_recurrent_reference
from flashmorph.model.morph import ATTN_KEY, MorphableLM, morph_model
from flashmorph.training.losses.retrieval import RetrievalLossModel

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_softmax_gates_reproduce_the_original_logits(tiny_lm, family):
    lm = tiny_lm(family)
    ids = torch.randint(0, 64, (2, 37))
    with torch.no_grad():
        reference = lm(ids).logits
        morphed = morph_model(lm)
        out = morphed.logits(ids, gate_values=torch.ones(lm.config.num_hidden_layers))
    assert lm.config._attn_implementation == ATTN_KEY
    assert torch.equal(out, reference)


def _capture_pre_rope_projections(lm):
    """Forward hooks that keep each layer's q/k/v before RoPE (after q/k norm where the family has one)."""
    captured = {}

    def keep(key, num_heads):
        def hook(module, inputs, output):
            B, T = output.shape[:2]
            captured[key] = output.reshape(B, T, num_heads, -1).transpose(1, 2)  # [B, H, T, D]
        return hook

    cfg = lm.config
    for idx, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        attn.layer_idx = idx
        (getattr(attn, "q_norm", None) or attn.q_proj).register_forward_hook(keep((idx, "q"), cfg.num_attention_heads))
        (getattr(attn, "k_norm", None) or attn.k_proj).register_forward_hook(keep((idx, "k"), cfg.num_key_value_heads))
        attn.v_proj.register_forward_hook(keep((idx, "v"), cfg.num_key_value_heads))
    return captured


def _reference_linear_attention(captured):
    """Liger GLA written out from the recurrence: softmax feature maps, decay logsigmoid(k)/16, GQA repeat."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        q, k, v = (captured[(module.layer_idx, name)] for name in "qkv")
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        to_bthd = lambda x: x.transpose(1, 2).float()  # noqa: E731
        out, _ = gla_recurrent_reference(
            to_bthd(q).softmax(-1), to_bthd(k).softmax(-1), to_bthd(v), F.logsigmoid(to_bthd(k)) / 16.0, scale=1.0)
        return out.to(value.dtype), None  # [B, T, H, D]

    return attention


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_all_linear_gates_equal_a_pure_linear_attention_model(tiny_lm, family):
    lm = tiny_lm(family, seed=3)
    ids = torch.randint(0, 64, (2, 45))
    captured = _capture_pre_rope_projections(lm)
    AttentionInterface.register("linear_reference", _reference_linear_attention(captured))
    lm.config._attn_implementation = "linear_reference"
    with torch.no_grad():
        reference = lm(ids).logits
        out = morph_model(lm).logits(ids, gate_values=torch.zeros(lm.config.num_hidden_layers))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_post_rope_switch_changes_the_linear_branch(tiny_lm):
    ids = torch.randint(0, 64, (1, 33))
    zeros = torch.zeros(4)
    with torch.no_grad():
        pre = morph_model(tiny_lm()).logits(ids, gate_values=zeros)
        post = morph_model(tiny_lm(), MorphConfig(qk_source="post_rope")).logits(ids, gate_values=zeros)
    assert not torch.allclose(pre, post)


def test_gate_mix_is_the_weighted_sum_of_both_branches(tiny_lm):
    """With one layer, out_attn(g) is affine in g, so logits at g=0.3 lie between... checked on the attention
    output: a per-head gate of [1, 0, 1, 0] must equal softmax heads 0/2 and linear heads 1/3."""
    lm = tiny_lm(num_layers=1)
    morphed = morph_model(lm, MorphConfig(gate_granularity="head"))
    assert morphed.gates.gate_logits.shape == (1, 4)
    attn_outputs = {}
    o_proj = lm.model.layers[0].self_attn.o_proj
    o_proj.register_forward_hook(lambda m, inp, out: attn_outputs.__setitem__("x", inp[0]))
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        morphed.logits(ids, gate_values=torch.ones(1, 4))
        soft = attn_outputs["x"].view(2, 21, 4, 16)
        morphed.logits(ids, gate_values=torch.zeros(1, 4))
        lin = attn_outputs["x"].view(2, 21, 4, 16)
        morphed.logits(ids, gate_values=torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
        mixed = attn_outputs["x"].view(2, 21, 4, 16)
        morphed.logits(ids, gate_values=torch.full((1, 4), 0.3))
        blend = attn_outputs["x"].view(2, 21, 4, 16)
    torch.testing.assert_close(mixed[:, :, 0::2], soft[:, :, 0::2])
    torch.testing.assert_close(mixed[:, :, 1::2], lin[:, :, 1::2])
    torch.testing.assert_close(blend, 0.3 * soft + 0.7 * lin, rtol=1e-5, atol=1e-6)


def test_only_gates_train_and_frozen_weights_stay_bit_identical(tiny_lm):
    lm = tiny_lm()
    morphed = RetrievalLossModel(lm, MorphConfig())  # the morphed model with gate search's loss in its forward
    frozen_before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    trainable = [n for n, p in morphed.named_parameters() if p.requires_grad]
    assert trainable == ["gates.gate_logits"]
    optimizer = torch.optim.AdamW([morphed.gates.gate_logits], lr=0.1, weight_decay=0.1)
    gates_before = morphed.gates.gate_logits.detach().clone()
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 25))
        labels = ids.clone()
        labels[:, :15] = -100
        out = morphed(ids, labels=labels)
        loss = out["loss_sum"] / out["num_tokens"] + 0.5 * out["gate_values"].mean()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in lm.parameters())
        assert morphed.gates.gate_logits.grad is not None and morphed.gates.gate_logits.grad.abs().sum() > 0
        optimizer.step()
    assert not torch.equal(morphed.gates.gate_logits, gates_before)
    for name, param in lm.named_parameters():
        assert torch.equal(param, frozen_before[name]), name


def test_loss_on_answer_tokens_matches_full_logits(tiny_lm):
    morphed = RetrievalLossModel(tiny_lm(), MorphConfig())
    ids = torch.randint(0, 64, (3, 30))
    labels = torch.full_like(ids, -100)
    labels[:, 20:] = ids[:, 20:]
    with torch.no_grad():
        out = morphed(ids, labels=labels)
        logits = morphed.logits(ids)
        answers = MorphableLM.forward(morphed, ids, labels=labels)  # what the model hands the loss
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out["loss_sum"], expected, rtol=1e-5, atol=1e-5)
    assert out["num_tokens"].item() == 30
    assert answers["hidden"].shape == (30, morphed.lm.config.hidden_size)  # only answer tokens reach the head
    assert torch.equal(answers["targets"], labels[:, 1:][labels[:, 1:] != -100])
