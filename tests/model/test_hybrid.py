"""The hybrid model: greedy generation through the hybrid cache equals full-sequence argmax decoding, linear
layers keep a recurrent state instead of K/V, and cache memory falls with every layer made linear."""

import inspect
import json

import pytest
import torch
from transformers import DynamicCache

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.model.hybrid import apply_hybrid_layout, make_hybrid_cache, read_layout
from flashmorph.model.hybrid_cache import RecurrentStateLayer, cache_nbytes

LAYOUTS = {
    "no_linear": ["full", "full", "full", "full"],
    "some_linear": ["linear", "full", "linear", "full"],
    "all_linear": ["linear", "linear", "linear", "linear"],
}


def _greedy_without_cache(lm, ids, num_new_tokens):
    """Reference decoding: each step reruns the whole sequence with no cache and takes the argmax."""
    logits = []
    for _ in range(num_new_tokens):
        last = lm(ids, use_cache=False).logits[:, -1]  # [B, vocab]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


def _cache_kwarg(lm) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (5.17 on the GPU machine has the old name)
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


def _generate(lm, ids, num_new_tokens, **kwargs):
    # eos_token_id=None: the reference never stops early, so neither may generate
    return lm.generate(ids, max_new_tokens=num_new_tokens, do_sample=False, eos_token_id=None,
                       return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_equals_full_sequence_argmax(tiny_lm, family, layout):
    lm = apply_hybrid_layout(tiny_lm(family, seed=1), layout)
    ids = torch.randint(3, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = _generate(lm, ids, 8)
        expected_ids, expected_logits = _greedy_without_cache(lm, ids, 8)
    assert torch.equal(out.sequences, expected_ids)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected_logits), rtol=1e-4, atol=1e-5)


def test_linear_layers_keep_a_recurrent_state_and_no_kv(tiny_lm):
    lm = apply_hybrid_layout(tiny_lm("qwen3"), LAYOUTS["some_linear"])
    cache = make_hybrid_cache(lm)
    ids = torch.randint(3, 64, (2, 17))
    with torch.no_grad():
        _generate(lm, ids, 6, **{_cache_kwarg(lm): cache})
    seen = 17 + 6 - 1  # the last generated token is never fed back
    for idx, mode in enumerate(LAYOUTS["some_linear"]):
        layer = cache.layers[idx]
        if mode == "linear":
            assert isinstance(layer, RecurrentStateLayer)
            assert layer.keys is None and layer.values is None
            assert layer.state.shape == (2, 4, 16, 16) and layer.state.dtype == torch.float32  # [B, H, D, Dv]
            assert layer.get_seq_length() == seen
        else:
            assert layer.keys.shape == (2, 2, seen, 16)  # [B, Hkv, T, D]
    assert cache.get_seq_length() == seen


def test_cache_bytes_fall_with_every_linear_layer(tiny_lm):
    batch, prompt, new, fp32 = 1, 40, 8, 4
    seen = prompt + new - 1
    kv_layer_bytes = 2 * batch * 2 * seen * 16 * fp32  # K and V: [B, Hkv, T, D]
    state_bytes = batch * 4 * 16 * 16 * fp32  # [B, H, D, Dv]
    ids = torch.randint(3, 64, (batch, prompt))
    measured = []
    for num_linear in range(5):
        layout = ["linear"] * num_linear + ["full"] * (4 - num_linear)
        lm = apply_hybrid_layout(tiny_lm(), layout)
        with torch.no_grad():
            out = _generate(lm, ids, new)
        measured.append(cache_nbytes(_cache_of(out)))
        assert measured[-1] == num_linear * state_bytes + (4 - num_linear) * kv_layer_bytes
    assert all(later < earlier for earlier, later in zip(measured, measured[1:])), measured


def test_a_manual_decode_loop_and_chunked_prefill_match_one_forward(tiny_lm):
    """Feeding the sequence as 11 + 1 + 1 + 7 tokens through the cache gives the no-cache logits."""
    lm = apply_hybrid_layout(tiny_lm("llama", seed=2), LAYOUTS["some_linear"])
    ids = torch.randint(3, 64, (1, 20))
    with torch.no_grad():
        expected = lm(ids, use_cache=False).logits
        cache, pieces = None, []
        for start, stop in ((0, 11), (11, 12), (12, 13), (13, 20)):
            out = lm(ids[:, start:stop], use_cache=True, **{_cache_kwarg(lm): cache})
            cache = _cache_of(out)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-4, atol=1e-5)


def test_padded_prompts_are_refused(tiny_lm):
    lm = apply_hybrid_layout(tiny_lm(), LAYOUTS["some_linear"])
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(FlashMorphError, match="padding"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_a_cache_holding_kv_for_a_linear_layer_is_refused(tiny_lm):
    lm = apply_hybrid_layout(tiny_lm(), LAYOUTS["some_linear"])
    cache = DynamicCache()
    for idx in range(4):
        cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), idx)
    with pytest.raises(FlashMorphError, match="K/V for linear layer 0"):
        lm(torch.randint(3, 64, (1, 2)), **{_cache_kwarg(lm): cache})


def test_layouts_are_read_and_checked(tiny_lm, tmp_path):
    path = tmp_path / "hybrid.json"
    path.write_text(json.dumps({"layer_types": LAYOUTS["some_linear"], "method": "gates"}))
    assert read_layout(path, num_layers=4) == LAYOUTS["some_linear"]
    path.write_text(json.dumps({"layers": LAYOUTS["all_linear"]}))
    assert read_layout(path) == LAYOUTS["all_linear"]
    with pytest.raises(ConfigError, match="has 3 layers but the model has 4"):
        apply_hybrid_layout(tiny_lm(), ["full", "linear", "full"])
    with pytest.raises(ConfigError, match="layer 1 is 'mixed'"):
        apply_hybrid_layout(tiny_lm(), ["full", "mixed", "full", "full"])
    path.write_text(json.dumps({"layer_types": ["full"] * 4, "full_heads": [[True, False]] + [[True, True]] * 3}))
    with pytest.raises(ConfigError, match="head-level"):
        read_layout(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_layout(tmp_path / "missing.json")
