"""The adapter files save_adapter writes: the same bytes from any process, written atomically, loadable by peft."""

import json

import torch
from transformers import AutoModelForCausalLM

from flashmorph.model.tiny import tiny_config
from flashmorph.training import lora


def _peft_model(targets):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=2, hidden_size=64, num_heads=4,
                                                      num_kv_heads=2, vocab_size=64))
    return lora.add_lora(lm, rank=2, alpha=4.0, targets=targets, layers=None)


def test_adapter_config_bytes_do_not_depend_on_the_order_peft_holds_target_modules(tmp_path):
    model = _peft_model(["v_proj", "q_proj"])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    outs = []
    for order in (["v_proj", "q_proj"], ["q_proj", "v_proj"]):  # peft holds a set: its order varies by process
        model.peft_config["default"].target_modules = order
        out = tmp_path / "-".join(order)
        out.mkdir()
        lora.save_adapter(model, state, out)
        outs.append(out)
    first, second = ((o / lora.ADAPTER_CONFIG).read_bytes() for o in outs)
    assert first == second
    assert json.loads(first)["target_modules"] == ["q_proj", "v_proj"]
    assert sorted(p.name for p in outs[0].iterdir()) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]  # no temp left
    fresh = _peft_model(["q_proj", "v_proj"])
    lora.load_adapter(fresh, outs[0])
    for name, value in fresh.state_dict().items():
        if "lora_" in name:
            torch.testing.assert_close(value, state[name], rtol=0, atol=0)
