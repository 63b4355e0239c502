"""TP=2 shards load into megatron-core's parallel layers on 2 gloo ranks and reproduce the full model's layers."""

import torch
from helpers.multiproc import run_distributed
from reshard_helpers import save_tiny

from flashmorph.checkpoint.reshard import reshard
from flashmorph.parallel.tp_shards import rank_file

TP = 2


def _megatron_layers(info, hf_dir: str, tp_dir: str):
    """On each rank: megatron layers holding this rank's shard; returns (full-model outputs, TP outputs) to compare."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    try:
        rank = parallel_state.get_tensor_model_parallel_rank()
        shard = load_file(f"{tp_dir}/{rank_file(rank, TP)}")
        model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
        cfg = model.config
        config = ModelParallelConfig(tensor_model_parallel_size=TP, use_cpu_initialization=True,
                                     perform_initialization=False, params_dtype=torch.float32)
        keep = dict(config=config, init_method=lambda weight: None)

        def column(name, n_in, n_out):
            layer = ColumnParallelLinear(n_in, n_out, bias=False, gather_output=False, **keep)
            layer.weight.data.copy_(shard[name])
            return layer

        def row(name, n_in, n_out):
            layer = RowParallelLinear(n_in, n_out, bias=False, input_is_parallel=True, skip_bias_add=False, **keep)
            layer.weight.data.copy_(shard[name])
            return layer

        hidden, heads, kv_heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.head_dim
        prefix = "model.layers.0"
        q = column(f"{prefix}.self_attn.q_proj.weight", hidden, heads * head_dim)
        k = column(f"{prefix}.self_attn.k_proj.weight", hidden, kv_heads * head_dim)
        v = column(f"{prefix}.self_attn.v_proj.weight", hidden, kv_heads * head_dim)
        o = row(f"{prefix}.self_attn.o_proj.weight", heads * head_dim, hidden)
        gate = column(f"{prefix}.mlp.gate_proj.weight", hidden, cfg.intermediate_size)
        up = column(f"{prefix}.mlp.up_proj.weight", hidden, cfg.intermediate_size)
        down = row(f"{prefix}.mlp.down_proj.weight", cfg.intermediate_size, hidden)
        embed = VocabParallelEmbedding(cfg.vocab_size, hidden, **keep)
        embed.weight.data.copy_(shard["model.embed_tokens.weight"])
        lm_head = column("lm_head.weight", hidden, cfg.vocab_size)

        torch.manual_seed(0)
        seq = 7
        ids = torch.randint(0, cfg.vocab_size, (1, seq))
        x = torch.randn(1, seq, hidden)  # [batch, seq, hidden]; megatron's linears do not care about the order
        layer = model.model.layers[0]
        position_ids = torch.arange(seq)[None]
        cos, sin = model.model.rotary_emb(x, position_ids)
        with torch.no_grad():
            full = {"embed": model.model.embed_tokens(ids), "mlp": layer.mlp(x),
                    "attn": layer.self_attn(x, position_embeddings=(cos, sin), attention_mask=None)[0],
                    "logits_local": model.lm_head(x).chunk(TP, dim=-1)[rank]}
            # attention with this rank's query heads and the kv heads they use (GQA), then the row-parallel o_proj
            local_heads, local_kv = heads // TP, kv_heads // TP
            q_loc = q(x)[0].view(1, seq, local_heads, head_dim).transpose(1, 2)  # [batch, heads, seq, head_dim]
            k_loc = k(x)[0].view(1, seq, local_kv, head_dim).transpose(1, 2)
            v_loc = v(x)[0].view(1, seq, local_kv, head_dim).transpose(1, 2)
            q_loc, k_loc = apply_rotary_pos_emb(q_loc, k_loc, cos, sin)
            groups = local_heads // local_kv
            attn = torch.nn.functional.scaled_dot_product_attention(
                q_loc, k_loc.repeat_interleave(groups, 1), v_loc.repeat_interleave(groups, 1), is_causal=True)
            tp_out = {"embed": embed(ids),
                      "mlp": down(torch.nn.functional.silu(gate(x)[0]) * up(x)[0])[0],
                      "attn": o(attn.transpose(1, 2).reshape(1, seq, local_heads * head_dim))[0],
                      "logits_local": lm_head(x)[0]}
        return full, tp_out
    finally:
        parallel_state.destroy_model_parallel()


def test_tp_shards_run_in_megatron_layers(tmp_path):
    save_tiny(tmp_path / "hf", "llama", num_heads=4, num_kv_heads=2)
    reshard("hf", "tp", tmp_path / "hf", tmp_path / "tp", tp=TP, show_progress=False)
    for full, tp_out in run_distributed(_megatron_layers, TP, str(tmp_path / "hf"), str(tmp_path / "tp")):
        assert torch.equal(tp_out["embed"], full["embed"])  # vocab-parallel: one rank holds each row, others add 0
        assert torch.equal(tp_out["logits_local"], full["logits_local"])  # column-parallel lm_head: a vocab slice
        torch.testing.assert_close(tp_out["mlp"], full["mlp"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tp_out["attn"], full["attn"], rtol=1e-5, atol=1e-6)
