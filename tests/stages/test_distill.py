"""The distillation stage under the real DeepSpeed ZeRO-3 engine on CPU: it learns, ranks agree, resume is exact."""

import json
from pathlib import Path

import pytest
import torch

from flashmorph.config import DistillRecipe, load_recipe, validate_distill_recipe
from flashmorph.errors import ConfigError
from flashmorph.io.atomic import load_safetensors_verified
from flashmorph.model.tiny import build_tiny_model, tiny_config
from helpers.multiproc import run_distributed

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "embedded_distill.yaml"
LAYOUT = ["full", "linear", "linear", "full"]


def _config():
    config = tiny_config("llama", num_layers=4)
    config.initializer_range = 0.3  # peaked logits: at 0.02 every distribution is near uniform and the KL ~1e-3
    return config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_teacher")
    build_tiny_model(_config(), seed=3).save_pretrained(path)
    (path / "hybrid.json").write_text(json.dumps({"layer_types": LAYOUT}))
    return path


def _overrides(model_dir, run_dir, steps=4, micro=4, extra=()):
    return [f"model.path={model_dir}", f"student.layout={model_dir / 'hybrid.json'}", f"run.run_dir={run_dir}",
            f"distill.steps={steps}", f"distill.micro_batch_size={micro}", "distill.save_every=0",
            "distill.warmup_steps=0", "data.seq_len=32", "data.num_pairs=4", "distill.token_chunk=24",
            "distill.vocab_chunk=40", "text.weight=0", *extra]


def _distill(info, overrides, resume=False):
    from flashmorph.stages.distill import run_distill

    recipe = load_recipe(RECIPE, overrides, cls=DistillRecipe)
    result = run_distill(recipe, info, resume=resume, show_progress=False)
    return result.kl_history


def _heldout_kl(model, teacher, ids):
    with torch.no_grad():
        t = torch.log_softmax(teacher(ids).logits.float(), -1)
        s = torch.log_softmax(model(ids).logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_distillation_reduces_the_kl_and_exports_base_plus_adapter(model_dir, tmp_path):
    """A real run (LoRA in the two linear layers; teacher = the same weights, adapters off, all softmax): the
    exported student is closer to the teacher on held-out samples than the untrained hybrid, and equals the base
    model plus the adapter the run saved."""
    from flashmorph.data import RetrievalDataset
    from flashmorph.data.config import DataConfig
    from flashmorph.data.token_space import TokenSpace
    from flashmorph.export import load_hybrid
    from flashmorph.model.hybrid import apply_hybrid_layout
    from flashmorph.model.load import load_causal_lm
    from flashmorph.training import lora

    history = run_distributed(_distill, 1, _overrides(model_dir, tmp_path / "run", steps=30, micro=8,
                                                      extra=["distill.lr=0.01"]))[0]
    assert len(history) == 30 and all(v > 0 for v in history)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kl_per_token"]["first"] == pytest.approx(history[0])

    data = DataConfig(tasks={"mqar": 1.0}, seq_len=32, num_pairs=4, kv_separator=False, seed=99)
    ids = RetrievalDataset(data, TokenSpace.synthetic(64), split="eval").batch(range(16))["input_ids"]
    teacher = load_causal_lm(model_dir, "float32")
    base = apply_hybrid_layout(load_causal_lm(model_dir, "float32"), LAYOUT)
    student = load_hybrid(tmp_path / "run" / "student")
    assert student.config.flashmorph["layer_types"] == LAYOUT
    before, after = _heldout_kl(base, teacher, ids), _heldout_kl(student, teacher, ids)
    assert after < 0.95 * before, f"held-out KL {before:.4f} -> {after:.4f}"

    # the same student rebuilt the peft way: base weights, hybrid layout, the adapter the run saved
    rebuilt = apply_hybrid_layout(load_causal_lm(model_dir, "float32"), LAYOUT)
    rebuilt = lora.add_lora(rebuilt, rank=8, alpha=16.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"], layers=[1, 2])
    lora.load_adapter(rebuilt, tmp_path / "run" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, rebuilt(ids).logits, rtol=1e-4, atol=1e-5)


def test_two_data_parallel_ranks_match_one_process(model_dir, tmp_path):
    single = run_distributed(_distill, 1, _overrides(model_dir, tmp_path / "one", micro=4, extra=["distill.grad_accum_steps=2"]))[0]
    double = run_distributed(_distill, 2, _overrides(model_dir, tmp_path / "two", micro=2, extra=["distill.grad_accum_steps=2"]))
    assert double[0] == double[1]
    torch.testing.assert_close(torch.tensor(double[0]), torch.tensor(single), rtol=1e-5, atol=1e-7)
    assert single[-1] < single[0]


def _distill_runs(info, runs):
    """Several distill runs in one world, in order (a world's start-up costs more than a tiny run)."""
    return [_distill(info, overrides) for overrides in runs]


def _student_weights(run_dir):
    from safetensors.torch import load_file

    return {name: tensor for path in sorted((run_dir / "student").glob("*.safetensors"))
            for name, tensor in load_file(path).items()}


@pytest.mark.parametrize("extra, lora", [
    (["parallel.sequence_parallel=2"], False),  # Ulysses: each rank holds half of every sequence
    (["parallel.tensor_parallel=2", "distill.trainable=linear"], True),  # megatron TP: half of every projection
], ids=["sp2", "tp2"])
def test_sequence_and_tensor_parallel_match_one_process(model_dir, tmp_path, extra, lora):
    trainable = [e for e in extra if e.startswith("distill.")]
    lr = ["distill.lr=0.01"]
    single_runs = [_overrides(model_dir, tmp_path / "one", extra=[*lr, *trainable])]
    double_runs = [_overrides(model_dir, tmp_path / "two", extra=[*lr, *extra])]
    if lora:
        # LoRA under TP (the recipe's default trainable set): a fresh TP=2 adapter init is drawn differently from
        # TP=1, so both continue from the adapters of one finished 1-process run (lora_B no longer zero)
        from_init = [*lr, f"student.init_from={tmp_path / 'init'}"]
        single_runs += [_overrides(model_dir, tmp_path / "init", steps=2, extra=lr),
                        _overrides(model_dir, tmp_path / "one_lora", extra=from_init)]
        double_runs += [_overrides(model_dir, tmp_path / "two_lora", extra=[*from_init, "parallel.tensor_parallel=2"])]
    single = run_distributed(_distill_runs, 1, single_runs)[0]
    double = run_distributed(_distill_runs, 2, double_runs)
    assert double[0] == double[1]
    torch.testing.assert_close(torch.tensor(double[0][0]), torch.tensor(single[0]), rtol=1e-5, atol=1e-6)
    assert single[0][-1] != single[0][0]
    if lora:
        torch.testing.assert_close(torch.tensor(double[0][1]), torch.tensor(single[2]), rtol=1e-5, atol=1e-6)
        assert single[2][-1] != single[2][0]
        # the TP run gathers its adapter slices and exports the same merged student and adapter as one process
        one, two = _student_weights(tmp_path / "one_lora"), _student_weights(tmp_path / "two_lora")
        assert one.keys() == two.keys() and one
        _assert_trained_alike(two, one)
        init = _student_weights(tmp_path / "init")
        assert any(not torch.equal(init[name], one[name]) for name in one), "the adapters did not move"
        adapter = {name: load_safetensors_verified(tmp_path / name / "adapter" / "adapter_model.safetensors")
                   for name in ("one_lora", "two_lora")}
        assert adapter["one_lora"].keys() == adapter["two_lora"].keys()
        _assert_trained_alike(adapter["two_lora"], adapter["one_lora"])


def _assert_trained_alike(got: dict, expected: dict) -> None:
    """Weights after 4 AdamW steps on 1 vs 2 ranks. Adam divides by the gradient's own size, so an element whose
    gradient is near zero turns fp32 summation-order noise into a visible difference (the adapters move by ~2e-2
    here, one element of 512 by 1.5e-4 more under TP); a wrong slice or a missed all-reduce moves whole rows by
    the step size (~1e-2). So: every element within 5e-4, and on average within 5e-6 (6e-7 measured)."""
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=5e-4, msg=name)
        assert (got[name] - tensor).abs().mean().item() < 5e-6, name


def test_resume_continues_exactly(model_dir, tmp_path):
    full = run_distributed(_distill, 1, _overrides(model_dir, tmp_path / "full", steps=6,
                                                   extra=["distill.save_every=3", "distill.lr=0.01"]))[0]
    part = _overrides(model_dir, tmp_path / "part", steps=6, extra=["distill.save_every=3", "distill.lr=0.01"])
    run_distributed(_distill, 1, part)
    # drop the final checkpoint so that the resumed run starts from step 3
    import shutil

    from flashmorph.checkpoint.atomic import list_checkpoints

    for ckpt in list_checkpoints(tmp_path / "part" / "checkpoints"):
        if ckpt.name.endswith("6"):
            shutil.rmtree(ckpt)
    resumed = run_distributed(_distill, 1, part, True)[0]
    assert len(resumed) == 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=0, atol=0)


@pytest.mark.parametrize("extra, world, message", [
    (["parallel.tensor_parallel=2"], 3, "tensor_parallel"),
    (["parallel.sequence_parallel=3"], 3, "sequence_parallel"),
    (["distill.trainable=adapters"], 1, "distill.trainable"),
    (["student.layout=null"], 1, "student.layout"),
])
def test_bad_recipes_fail_before_anything_is_built(model_dir, tmp_path, extra, world, message):
    recipe = load_recipe(RECIPE, _overrides(model_dir, tmp_path / "bad", extra=extra), cls=DistillRecipe)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_distill_recipe(recipe, world)
    assert not (tmp_path / "bad").exists()
