"""The state-dict adapter: TP pieces equal megatron's partitioning done by hand (GQA), sizes that do not divide fail."""

import pytest
import torch
from reshard_helpers import save_tiny

from flashmorph.checkpoint.reshard import check_tp_size, reshard, tp_rule
from flashmorph.checkpoint.reshard.adapter import zero3_to_hf_names
from flashmorph.errors import CheckpointError, ConfigError
from flashmorph.io.safetensors import SafetensorsFile, StreamingSafetensorsWriter
from flashmorph.model.shape import ModelShape
from flashmorph.model.tiny import tiny_config
from flashmorph.parallel.tp_shards import rank_file


def test_tp_shards_match_megatron_partitioning_by_hand(tmp_path):
    # 8 query heads, 2 kv heads: each of 2 ranks owns 4 query heads and the one kv head they attend with
    heads, kv_heads, head_dim, tp = 8, 2, 8, 2
    ref = save_tiny(tmp_path / "hf", "qwen3", num_heads=heads, num_kv_heads=kv_heads, hidden_size=heads * head_dim)
    reshard("hf", "tp", tmp_path / "hf", tmp_path / "tp", tp=tp, show_progress=False)
    hidden, layer = heads * head_dim, "model.layers.1"
    for rank in range(tp):
        shard = SafetensorsFile(tmp_path / "tp" / rank_file(rank, tp))
        get = shard.get
        q_heads = ref[f"{layer}.self_attn.q_proj.weight"].view(heads, head_dim, hidden)
        assert torch.equal(get(f"{layer}.self_attn.q_proj.weight"),
                           q_heads[rank * 4:(rank + 1) * 4].reshape(-1, hidden))
        for proj in ("k_proj", "v_proj"):
            kv = ref[f"{layer}.self_attn.{proj}.weight"].view(kv_heads, head_dim, hidden)
            assert torch.equal(get(f"{layer}.self_attn.{proj}.weight"), kv[rank])
        o_proj = ref[f"{layer}.self_attn.o_proj.weight"]  # [hidden, heads * head_dim]: input columns per head
        columns = slice(rank * 4 * head_dim, (rank + 1) * 4 * head_dim)
        assert torch.equal(get(f"{layer}.self_attn.o_proj.weight"), o_proj[:, columns])
        inter = ref[f"{layer}.mlp.up_proj.weight"].shape[0] // tp
        for proj in ("gate_proj", "up_proj"):
            assert torch.equal(get(f"{layer}.mlp.{proj}.weight"),
                               ref[f"{layer}.mlp.{proj}.weight"][rank * inter:(rank + 1) * inter])
        assert torch.equal(get(f"{layer}.mlp.down_proj.weight"),
                           ref[f"{layer}.mlp.down_proj.weight"][:, rank * inter:(rank + 1) * inter])
        vocab = ref["model.embed_tokens.weight"].shape[0] // tp
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(get(name), ref[name][rank * vocab:(rank + 1) * vocab])
        for name in (f"{layer}.self_attn.q_norm.weight", f"{layer}.self_attn.k_norm.weight",
                     f"{layer}.input_layernorm.weight", "model.norm.weight"):
            assert torch.equal(get(name), ref[name])  # replicated


def test_rules_name_the_split():
    assert tp_rule("model.layers.3.self_attn.k_proj.bias").split_dim == 0  # qwen2 biases follow their rows
    assert tp_rule("model.layers.3.self_attn.o_proj.bias").kind == "replicated"  # added after the all-reduce
    assert tp_rule("model.layers.3.mlp.down_proj.weight").split_dim == 1
    with pytest.raises(CheckpointError, match="no tensor-parallel rule for weight 'model.layers.0.router.weight'"):
        tp_rule("model.layers.0.router.weight")


@pytest.mark.parametrize("tp, field", [(3, "num_heads"), (4, "num_kv_heads"), (0, "--tp must be")])
def test_tp_size_must_divide_heads_kv_heads_vocab(tp, field):
    dims = ModelShape.from_config(tiny_config("llama", num_heads=4, num_kv_heads=2))
    with pytest.raises(ConfigError, match=field) as info:
        check_tp_size(dims, tp)
    assert "\n" not in str(info.value)
    check_tp_size(dims, 2)
    with pytest.raises(ConfigError, match="vocab_size=63"):
        check_tp_size(ModelShape.from_config(tiny_config("llama", num_kv_heads=4, vocab_size=63)), 2)


def test_zero3_names_map_through_a_wrapper_prefix():
    hf_names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    zero_names = ["lm.model.embed_tokens.weight", "lm.model.norm.weight", "lm.lm_head.weight", "gates.gate_logits"]
    mapping, extras = zero3_to_hf_names(zero_names, hf_names)
    assert mapping["model.norm.weight"] == "lm.model.norm.weight" and extras == ["gates.gate_logits"]
    with pytest.raises(CheckpointError, match="lacks 1 of the model's 3 weights"):
        zero3_to_hf_names(zero_names[:2] + zero_names[3:], hf_names)
    with pytest.raises(CheckpointError, match="gate search saves only the gates"):
        zero3_to_hf_names(["gates.gate_logits"], hf_names)


def test_streaming_writer_matches_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7), "c": torch.zeros(0, 4), "d": torch.tensor(2.5)}
    plan = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", plan, metadata={"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    with pytest.raises(CheckpointError, match="planned a"):
        with StreamingSafetensorsWriter(tmp_path / "y.safetensors", plan) as writer:
            writer.write("b", tensors["b"])
