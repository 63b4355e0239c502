"""The families table: every supported family, at every softmax_impl, reproduces the original model's logits at
gate = softmax (morphable model, hybrid with every layer full, generate with the hybrid cache); others are refused."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flashmorph.errors import ConfigError
from flashmorph.model.config import SOFTMAX_IMPLS, MorphConfig
from flashmorph.model.families import SUPPORTED_MODEL_TYPES, check_family
from flashmorph.model.hybrid import apply_hybrid_layout
from flashmorph.model.morph import morph_model
from flashmorph.model.tiny import build_tiny_model, tiny_config

ATOL = 1e-5  # fp32; eager and SDPA differ by float rounding only (~2e-7 measured)


def _ids(seed=0, length=19):
    return torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", SOFTMAX_IMPLS)
@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_gates_at_softmax_reproduce_the_original_logits(tiny_lm, family, impl):
    ids = _ids()
    with torch.no_grad():
        reference = tiny_lm(family)(ids).logits
        morphed = morph_model(tiny_lm(family), MorphConfig(softmax_impl=impl))
        out = morphed.logits(ids, gate_values=torch.ones(4))
    torch.testing.assert_close(out, reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("impl", SOFTMAX_IMPLS)
@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_an_all_full_hybrid_reproduces_the_original_forward_and_generate(tiny_lm, family, impl):
    ids = _ids(1, 13)
    original = tiny_lm(family, seed=2)
    hybrid = apply_hybrid_layout(tiny_lm(family, seed=2), ["full"] * 4, MorphConfig(softmax_impl=impl))
    generate = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                    output_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids).logits, original(ids).logits, rtol=0, atol=ATOL)
        expected, got = original.generate(ids, **generate), hybrid.generate(ids, **generate)  # hybrid cache
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=0, atol=ATOL)


@pytest.mark.parametrize("impl", SOFTMAX_IMPLS)
def test_a_sliding_window_shorter_than_the_sequence_is_kept(impl):
    config = tiny_config("mistral")
    config.sliding_window = 4  # masks differ from plain causal from token 4 on
    ids = _ids(2, 16)
    with torch.no_grad():
        reference = build_tiny_model(config, seed=5)(ids).logits
        full_causal = build_tiny_model(tiny_config("mistral"), seed=5)(ids).logits
        out = morph_model(build_tiny_model(config, seed=5), MorphConfig(softmax_impl=impl)).logits(
            ids, gate_values=torch.ones(4))
    assert not torch.allclose(reference, full_causal, atol=1e-3)  # the window really matters here
    torch.testing.assert_close(out, reference, rtol=0, atol=ATOL)


def _tiny_foreign(model_type: str, **extra):
    config = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=64, vocab_size=64, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **extra)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(("model_type", "reason"), [("gemma2", "softcapping"), ("phi3", "qkv_proj")])
def test_unsupported_families_are_refused_by_name_in_the_api(model_type, reason):
    lm = _tiny_foreign(model_type)
    for apply in (lambda: morph_model(lm), lambda: apply_hybrid_layout(lm, ["full", "linear"])):
        with pytest.raises(ConfigError, match=rf"model_type '{model_type}' is not supported \(.*{reason}"):
            apply()
    assert lm.config._attn_implementation != "morph"  # nothing was changed on the model


@pytest.mark.parametrize(("config", "message"), [
    ({"num_hidden_layers": 2}, "has no model_type; add"),
    ({"model_type": 3}, "model_type 3 is not supported"),
    ({"model_type": "bert"}, "model_type 'bert' is not supported; flashmorph morphs llama, qwen2, qwen3, mistral"),
    ({"model_type": "llama", "final_logit_softcapping": 30.0}, "sets final_logit_softcapping=30.0"),
])
def test_check_family_names_the_key_and_the_fix(config, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_family(config, "model.path=/m")
    assert str(err.value).startswith("model.path=/m: ") and "\n" not in str(err.value)
