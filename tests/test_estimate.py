"""flashmorph.estimate and tools/estimate.py: hand-checked bytes on a tiny shape, monotonic behaviour, the
published presets, one-line errors, and the CLI in-process (table, JSON, --max-seq-len, recipes)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashmorph.cli import estimate as estimate_tool
from flashmorph.errors import ConfigError
from flashmorph.estimate import (
    UNCALIBRATED,
    DS_PREFETCH_BUCKET_ELEMS,
    DS_REDUCE_BUCKET_ELEMS,
    GIB,
    PRESETS,
    SEQ_LEN_STEP,
    EstimateSetup,
    ModelShape,
    estimate,
    load_shape,
    max_seq_len,
    preset_named_by,
)

ROOT = Path(__file__).resolve().parents[1]

# 2 layers, hidden 64, 4 heads of 16 (2 kv heads), MLP 128, vocab 100, untied
TINY = ModelShape("tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=100, tie_embeddings=False)
# by hand: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; MLP 3 * 64*128 = 24576; two norms 128 -> 36992 a layer;
# 2 layers 73984 + embedding 6400 + lm_head 6400 + final norm 64
TINY_PARAMS = 86848
TINY_ATTENTION = 12288


def run_cli(argv, capsys):
    code = estimate_tool.main([str(a) for a in argv])
    return code, capsys.readouterr()


# ----------------------------------------------------------------------------------------- hand-checked bytes


def test_full_finetune_bytes_by_hand():
    result = estimate(TINY, EstimateSetup(gpus=2, trainable="full", full_layers=1, seq_len=64))
    assert result.params_total == TINY_PARAMS == result.params_trainable
    assert result.weights == TINY_PARAMS * 2 / 2  # bf16, ZeRO-3 over 2 ranks
    assert result.teacher_weights == TINY_PARAMS * 2 / 2  # a separate frozen copy, sharded the same way
    assert result.gradients == TINY_PARAMS * 2 / 2 + TINY_PARAMS / 2 * 4  # bf16 partition + fp32 copy
    assert result.optimizer == TINY_PARAMS / 2 * 12  # fp32 m, v, master
    # prefetch bucket + largest gathered unit (a layer: 36992 > embedding 6400), plus DeepSpeed's reduce bucket and
    # the full-size gradient of the largest trainable module (the layer) before reduce-scatter, all in bf16
    assert result.zero_buffers == (DS_PREFETCH_BUCKET_ELEMS + 36992 + DS_REDUCE_BUCKET_ELEMS + 36992) * 2


def test_lora_bytes_by_hand():
    setup = EstimateSetup(trainable="lora", lora_rank=4, lora_linear_layers_only=False, full_layers=1)
    result = estimate(TINY, setup)
    # A [4, in] + B [out, 4]: q 4*(64+64) + k 4*(64+32) + v 4*(64+32) + o 4*(64+64) = 1792 a layer, 2 layers
    lora = 3584
    assert result.params_trainable == lora
    assert result.weights == (TINY_PARAMS + lora) * 2  # one GPU: nothing to shard
    assert result.teacher_weights == 0  # the teacher is the same weights with adapters off
    assert result.gradients == lora * 2 + lora * 4
    assert result.optimizer == lora * 12
    only_linear = estimate(TINY, dataclasses.replace(setup, lora_linear_layers_only=True))
    assert only_linear.params_trainable == lora / 2  # one of the two layers is linear
    # TP=2 (parallel.lora_tp): B of q/k/v splits its rows, A of o its columns; the other factor stays whole
    # q 4*64 + 64*4/2, k and v 4*64 + 32*4/2, o 4*64/2 + 64*4 = 1408 a layer, on each TP rank
    tp2 = estimate(TINY, dataclasses.replace(setup, gpus=2, tensor_parallel=2))
    assert tp2.params_trainable == 2 * 1408


def test_gates_and_linear_bytes_by_hand():
    gates = estimate(TINY, EstimateSetup(trainable="gates"))
    assert gates.params_trainable == 2 and gates.full_layers == "mixed"
    assert gates.optimizer == 2 * 12 and gates.teacher_weights == 0
    linear = estimate(TINY, EstimateSetup(trainable="linear", full_layers=1, gpus=4))
    assert linear.params_trainable == TINY_ATTENTION  # q/k/v/o of the one linear layer
    assert linear.optimizer == TINY_ATTENTION / 4 * 12
    assert linear.teacher_weights == TINY_PARAMS * 2 / 4


def test_checkpointed_activations_by_hand():
    # kept: (L + 1) layer-boundary hidden states in bf16, plus the final norm's fp32 input, its bf16 output and
    # RoPE cos/sin (2 * head_dim bf16), per token
    setup = EstimateSetup(seq_len=256, micro_batch=2, trainable="gates")
    result = estimate(TINY, setup, UNCALIBRATED)
    per_token = 3 * 64 * 2 + 64 * 4 + 64 * 2 + 2 * 16 * 2
    assert result.activations == per_token * 512


def test_tensor_parallel_splits_layers_not_embeddings():
    one = estimate(TINY, EstimateSetup(trainable="full", full_layers=1, gpus=2))
    two = estimate(TINY, EstimateSetup(trainable="full", full_layers=1, gpus=2, tensor_parallel=2))
    # TP=2: projections halve, norms and embeddings stay whole; ZeRO then shards over DP x SP = 1
    per_rank = 2 * (12288 + 24576) / 2 + 2 * 128 + 6400 + 6400 + 64
    assert two.params_total == per_rank
    assert two.weights == per_rank * 2 and one.weights == TINY_PARAMS * 2 / 2


# ----------------------------------------------------------------------------------------- behaviour


def test_more_gpus_less_weight_memory():
    shape = PRESETS["llama3-8b"]
    weights = [estimate(shape, EstimateSetup(gpus=g)).weights for g in (1, 2, 8, 64)]
    assert all(a > b for a, b in zip(weights, weights[1:]))
    assert weights[0] / weights[-1] == pytest.approx(64)


def test_longer_sequences_more_activation():
    shape = PRESETS["qwen3-8b"]
    runs = [estimate(shape, EstimateSetup(seq_len=n, trainable="lora")) for n in (8192, 32768, 131072)]
    for attr in ("activations", "layer_backward", "total"):
        values = [getattr(r, attr) for r in runs]
        assert all(a < b for a, b in zip(values, values[1:])), attr
    assert runs[0].weights == runs[-1].weights


def test_checkpointing_off_keeps_more_and_mixed_layers_cost_most():
    shape = PRESETS["llama3-8b"]
    on = estimate(shape, EstimateSetup(seq_len=8192))
    off = estimate(shape, EstimateSetup(seq_len=8192, activation_checkpointing=False))
    assert off.activations > 5 * on.activations
    mixed = estimate(shape, EstimateSetup(seq_len=8192, trainable="lora", full_layers="mixed"))
    hybrid = estimate(shape, EstimateSetup(seq_len=8192, trainable="lora", full_layers=8))
    assert mixed.layer_backward > hybrid.layer_backward  # a mixed layer keeps both branches


def test_tiled_loss_shrinks_logits():
    shape = PRESETS["llama3-8b"]
    untiled = estimate(shape, EstimateSetup(seq_len=16384, trainable="full", loss_chunk=0), UNCALIBRATED)
    tiled = estimate(shape, EstimateSetup(seq_len=16384, trainable="full", loss_chunk=1024), UNCALIBRATED)
    vocab_tiled = estimate(shape, EstimateSetup(seq_len=16384, trainable="full", loss_chunk=1024, vocab_chunk=16384), UNCALIBRATED)
    assert untiled.logits_loss > 8 * tiled.logits_loss > 8 * vocab_tiled.logits_loss
    # student logits + grad (bf16) and fp32 log-softmax + grad, teacher logits (bf16 + fp32), teacher hidden
    v, h = 128256, 4096
    assert tiled.logits_loss == 2 * 1024 * v * 2 + 2 * 1024 * v * 4 + 1024 * v * 2 + 1024 * v * 4 + 16384 * h * 2


def test_sequence_parallel_divides_activations():
    shape = PRESETS["llama3-70b"]
    sp1 = estimate(shape, EstimateSetup(gpus=8, tensor_parallel=8, seq_len=32768, trainable="linear"))
    sp8 = estimate(shape, EstimateSetup(gpus=64, tensor_parallel=8, sequence_parallel=8, seq_len=32768,
                                        trainable="linear"))
    assert sp8.activations == pytest.approx(sp1.activations / 8)
    assert sp8.tokens_per_step == sp1.tokens_per_step == 32768  # one sequence per step either way


def test_tokens_per_step():
    result = estimate(TINY, EstimateSetup(gpus=8, sequence_parallel=2, seq_len=1024, micro_batch=3, grad_accum=5))
    assert result.sequences_per_step == 3 * 5 * 4 and result.tokens_per_step == 60 * 1024


def test_70b_128k_on_64_gpus_is_reported():
    shape = PRESETS["llama3-70b"]
    setup = EstimateSetup(gpus=64, tensor_parallel=8, sequence_parallel=8, seq_len=131072, trainable="linear",
                          full_layers=20)
    result = estimate(shape, setup)
    layer = (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672) / 8 + 2 * 8192
    per_tp_rank = 80 * layer + 2 * 128256 * 8192 + 8192
    assert result.weights == pytest.approx(per_tp_rank * 2 / 8)  # then ZeRO-3 over SP x DP = 8
    parts = sum(getattr(result, name) for name in result.COMPONENTS)
    assert result.weights < result.total <= parts
    assert result.tokens_per_step == 131072


def test_presets_match_published_sizes():
    published = {"llama3-8b": 8.03e9, "llama3-70b": 70.55e9, "qwen3-4b": 4.02e9, "qwen3-8b": 8.19e9,
                 "qwen3-32b": 32.76e9}
    for name, count in published.items():
        params = estimate(PRESETS[name], EstimateSetup(trainable="full", full_layers=1)).params_total
        assert params == pytest.approx(count, rel=2e-3), name


def test_max_seq_len_is_the_longest_fit():
    shape, setup = PRESETS["llama3-8b"], EstimateSetup(trainable="lora")
    longest = max_seq_len(shape, setup, 80.0)
    assert longest % SEQ_LEN_STEP == 0
    assert estimate(shape, dataclasses.replace(setup, seq_len=longest)).fits(80.0)
    assert not estimate(shape, dataclasses.replace(setup, seq_len=longest + SEQ_LEN_STEP)).fits(80.0)
    assert max_seq_len(PRESETS["llama3-70b"], EstimateSetup(), 80.0) is None  # 140 GB of weights on one GPU


def test_estimator_does_not_import_torch():
    code = "import sys, flashmorph.estimate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}).returncode == 0


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("setup, message", [
    (EstimateSetup(gpus=3, tensor_parallel=3), "tensor_parallel=3 does not divide the model's num_heads=4"),
    (EstimateSetup(gpus=6, tensor_parallel=2, sequence_parallel=2), "gpus=6 is not divisible by"),
    (EstimateSetup(gpus=4, tensor_parallel=4), "tensor_parallel=4 exceeds the model's num_kv_heads=2"),
    (EstimateSetup(gpus=8, tensor_parallel=2, sequence_parallel=4),
     "tensor_parallel=2 x sequence_parallel=4 does not divide the model's num_heads=4 (2 attention heads per TP"),
    (EstimateSetup(seq_len=100, gpus=8, sequence_parallel=8), "num_heads=4 (4 attention heads per TP rank)"),
    (EstimateSetup(gpus=2, sequence_parallel=2, seq_len=101),
     "sequence_parallel=2 does not divide the sequence length 101"),
    (EstimateSetup(trainable="adapters"), "trainable='adapters' is unknown"),
    (EstimateSetup(trainable="linear", full_layers="mixed"), "give full_layers as a count"),
    (EstimateSetup(trainable="lora", full_layers=3), "full_layers=3 must be 'mixed' or an integer in 0..2"),
    (EstimateSetup(trainable="lora", lora_modules=("qkv",)), "lora_modules has 'qkv'"),
    (EstimateSetup(micro_batch=0), "micro_batch=0 must be a positive integer"),
])
def test_bad_layouts_give_one_line_errors(setup, message):
    with pytest.raises(ConfigError) as err:
        estimate(TINY, setup)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_layout_is_one_error_line(capsys):
    code, out = run_cli(["--preset", "llama3-8b", "--gpus", "12", "--sp", "8"], capsys)
    assert code == 2 and out.out == ""
    assert out.err.startswith("error: gpus=12 is not divisible by") and out.err.count("\n") == 1
    code, out = run_cli(["--preset", "llama3-8b", "--tp", "3", "--gpus", "3"], capsys)
    assert code == 2 and "tensor_parallel=3 does not divide the model's num_heads=32" in out.err
    code, out = run_cli(["--gpus", "8"], capsys)
    assert code == 2 and "pass --preset NAME or --model-dir DIR" in out.err


# ----------------------------------------------------------------------------------------- the CLI


def test_cli_table_for_70b_at_128k(capsys):
    code, out = run_cli(["--preset", "llama3-70b", "--gpus", "64", "--tp", "8", "--sp", "8", "--seq-len", "131072",
                         "--trainable", "linear", "--full-layers", "20"], capsys)
    assert code == 0, out.err
    table = out.out
    for label in ("weights (student)", "weights (teacher)", "gradients", "optimizer state", "ZeRO buffers",
                  "activations (kept)", "logits / loss", "total (peak)"):
        assert label in table
    expected = estimate(PRESETS["llama3-70b"], EstimateSetup(gpus=64, tensor_parallel=8, sequence_parallel=8,
                                                             seq_len=131072, trainable="linear", full_layers=20))
    total_line = next(line for line in table.splitlines() if line.startswith("total (peak)"))
    assert float(total_line.split()[-1]) == pytest.approx(expected.total / GIB, abs=0.01)
    assert f"fits on 80 GiB: {'yes' if expected.fits(80) else 'no'}" in table
    assert "tokens per optimizer step: 131,072" in table


def test_cli_json_and_fit_verdict(capsys):
    code, out = run_cli(["--preset", "llama3-70b", "--seq-len", "8192", "--json"], capsys)
    assert code == 0
    report = json.loads(out.out)
    assert report["fits"] is False and report["total_gib"] > 130  # 70B of bf16 weights on one GPU
    assert report["setup"]["trainable"] == "gates" and report["full_layers"] == "mixed"
    assert set(report["terms_bytes"]["saved_per_token"]) == {"mixed"}


def test_cli_max_seq_len(capsys):
    code, out = run_cli(["--preset", "qwen3-4b", "--trainable", "lora", "--max-seq-len", "--json",
                         "--gpu-memory-gib", "40"], capsys)
    assert code == 0
    report = json.loads(out.out)
    assert report["max_seq_len"] == max_seq_len(PRESETS["qwen3-4b"], EstimateSetup(trainable="lora"), 40.0)


def test_cli_model_dir_reads_config_json(tmp_path, capsys):
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=True).save_pretrained(tmp_path)
    shape = load_shape(model_dir=str(tmp_path))
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim,
            shape.intermediate_size, shape.vocab_size, shape.tie_embeddings, shape.qk_norm) == \
        (2, 64, 4, 2, 16, 128, 100, True, True)
    code, out = run_cli(["--model-dir", tmp_path, "--json", "--trainable", "full", "--full-layers", "1"], capsys)
    # TINY's count, minus the tied lm_head, plus Qwen3's q/k norms (2 x head_dim a layer)
    assert code == 0 and json.loads(out.out)["params_total_per_tp_rank"] == TINY_PARAMS - 6400 + 2 * 2 * 16
    code, out = run_cli(["--model-dir", tmp_path / "missing"], capsys)
    assert code == 2 and "holds no config.json" in out.err


RECIPE = """
model: {path: /nowhere, dtype: bfloat16, activation_checkpointing: true}
data: {seq_len: 4096}
distill:
  trainable: lora
  lora_rank: 8
  micro_batch_size: 2
  grad_accum_steps: 3
  token_chunk: 512
  length_schedule: [{seq_len: 8192, steps: 1}, {seq_len: 16384, steps: 1}]
parallel:
  zero_stage: 3
  layouts: {8: {tensor_parallel: 1, sequence_parallel: 4}}
"""


def test_cli_recipe_fills_flags(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    code, out = run_cli(["--recipe", recipe, "--preset", "qwen3-8b", "--gpus", "8", "--json"], capsys)
    assert code == 0, out.err
    setup = json.loads(out.out)["setup"]
    assert (setup["seq_len"], setup["sequence_parallel"], setup["micro_batch"], setup["grad_accum"]) == (16384, 4, 2, 3)
    assert (setup["trainable"], setup["lora_rank"], setup["loss_chunk"], setup["activation_checkpointing"]) == \
        ("lora", 8, 512, True)
    code, out = run_cli(["--recipe", recipe, "--preset", "qwen3-8b", "--gpus", "8", "--seq-len", "2048", "--sp", "1",
                         "--json"], capsys)
    assert code == 0 and json.loads(out.out)["setup"]["seq_len"] == 2048  # flags win
    code, out = run_cli(["--recipe", recipe, "--gpus", "8"], capsys)  # model.path /nowhere, no preset
    assert code == 2 and "model.path=/nowhere holds no config.json; pass --preset" in out.err


def test_cli_recipe_missing_fields(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: null}\nsearch: {micro_batch_size: 1}\n")
    code, out = run_cli(["--recipe", recipe, "--preset", "llama3-8b"], capsys)
    assert code == 2 and "lacks data.seq_len; add it or pass --seq-len" in out.err
    code, out = run_cli(["--recipe", recipe, "--preset", "llama3-8b", "--seq-len", "8192", "--json"], capsys)
    assert code == 0 and json.loads(out.out)["setup"]["trainable"] == "gates"
    recipe.write_text("data: {seq_len: 1024}\ndistill: {micro_batch_size: 1}\n")
    code, out = run_cli(["--recipe", recipe, "--preset", "llama3-8b"], capsys)
    assert code == 2 and "lacks distill.trainable" in out.err
    recipe.write_text("data: {seq_len: 1024}\n")
    code, out = run_cli(["--recipe", recipe, "--preset", "llama3-8b"], capsys)
    assert code == 2 and "has no search or distill section" in out.err


def test_preset_named_by_a_model_directory():
    assert preset_named_by("Meta-Llama-3-70B") == "llama3-70b"
    assert preset_named_by("Meta-Llama-3-8B-Instruct") == "llama3-8b"
    assert preset_named_by("qwen3_32b") == "qwen3-32b" and preset_named_by("Qwen3-4B") == "qwen3-4b"
    assert preset_named_by("Llama-3-80B") is None and preset_named_by("teacher") is None


def test_cli_recipe_whose_model_dir_is_absent_uses_the_preset_its_name_spells(capsys):
    """The README's command, as written: the 70B recipe's model.path does not exist on this machine."""
    code, out = run_cli(["--recipe", ROOT / "recipes" / "llama3_70b_long_context.yaml", "--gpus", "64"], capsys)
    assert code == 0, out.err
    assert out.out.startswith("model: llama3-70b (80 layers")
    assert out.err == ("note: the recipe's model.path=/models/Meta-Llama-3-70B holds no config.json; estimating the "
                       "preset llama3-70b its name spells (--model-dir DIR reads a real config.json)\n")


def test_cli_reads_the_real_recipes(capsys):
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        if recipe.name.startswith("embedded"):
            continue  # the embedded model is built at run time: no preset describes it
        preset = "-".join(recipe.stem.split("_")[:2])
        code, out = run_cli(["--recipe", recipe, "--preset", preset, "--gpus", "8", "--json"], capsys)
        assert code == 0, f"{recipe.name}: {out.err}"
