"""Bad inputs to every stage and tool: exit code 2, exactly one `error: ...` line on stderr naming the file or key
and the fix, no traceback, and nothing written (the run dir or --out absent, or an existing run dir untouched).

Entry points run in-process (their `main(argv)`, as the CLI calls it): a subprocess per case would cost seconds
each. Two subprocess cases prove a refusal imports neither torch nor DeepSpeed, so it comes in a fraction of a second.
"""

import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flashmorph.config import DistillRecipe, load_recipe, validate_distill_recipe, validate_recipe
from flashmorph.model.tiny import build_tiny_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
GATE_RECIPE = ROOT / "recipes" / "embedded.yaml"
DISTILL_RECIPE = ROOT / "recipes" / "embedded_distill.yaml"
LAYOUT = {"layer_types": ["full", "linear"], "full_layers": [0]}


def _entry(name: str):
    """flashmorph.cli.<name>: the command behind launcher/<name>.py or tools/<name>.py."""
    return importlib.import_module(f"flashmorph.cli.{name}")


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A valid tiny Llama directory (2 layers) with a hybrid.json; every case damages a copy of it."""
    path = tmp_path_factory.mktemp("good") / "model"
    build_tiny_model(tiny_config("llama", num_layers=2), seed=0).save_pretrained(path)
    (path / "hybrid.json").write_text(json.dumps(LAYOUT))
    return path


def _edit_config(model_dir: Path, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    (model_dir / "config.json").write_text(json.dumps(config))


_DROP = object()


def _truncate(model_dir: Path):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _tokenizer_of_another_model(model_dir: Path):
    vocab = {f"t{i}": i for i in range(200)}  # ids up to 199 for a model of vocab_size 64
    (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                          "added_tokens": []}))


def _write(name: str, data: bytes):
    def damage(model_dir: Path):
        (model_dir / name).write_bytes(data)
    return damage


# case id -> (what is done to a copy of the good model dir, a substring of the one-line error)
MODEL_DIR_CASES = {
    "config_without_num_attention_heads": (lambda d: _edit_config(d, num_attention_heads=_DROP),
                                           "config.json has no num_attention_heads; add it"),
    "num_attention_heads_as_string": (lambda d: _edit_config(d, num_attention_heads="4"),
                                      "num_attention_heads='4' must be a positive integer"),
    "config_without_model_type": (lambda d: _edit_config(d, model_type=_DROP), "config.json has no model_type; add"),
    "config_not_utf8": (_write("config.json", b'{"model_type": "llama\xff\xfe"}'),
                        "config.json is not readable JSON (UnicodeDecodeError)"),
    "config_is_a_list": (_write("config.json", b"[1, 2]"), "holds a JSON list, not an object"),
    "truncated_safetensors": (_truncate, "model.safetensors is truncated"),
    "safetensors_garbage": (_write("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00not json"),
                            "model.safetensors is not a valid safetensors file"),
    "config_without_weights": (lambda d: (d / "model.safetensors").unlink(), "holds config.json but no weights"),
    "pickle_weights_only": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                            "holds only pickle weights (pytorch_model.bin), which flashmorph never loads"),
    "gemma2_softcap": (lambda d: _edit_config(d, model_type="gemma2"),
                       "model_type 'gemma2' is not supported (its attention-logit and final-logit softcapping"),
    "phi3_fused_qkv": (lambda d: _edit_config(d, model_type="phi3"), "qkv_proj"),
    "llama_with_final_softcap": (lambda d: _edit_config(d, final_logit_softcapping=30.0),
                                 "sets final_logit_softcapping=30.0"),
    "config_of_another_model_heads": (lambda d: _edit_config(d, num_attention_heads=8, num_key_value_heads=4),
                                      "the config does not belong to these weights"),
    "config_of_another_model_layers": (lambda d: _edit_config(d, num_hidden_layers=3),
                                       "the weights hold 2 layers but config.json says num_hidden_layers=3"),
    "tokenizer_of_another_model": (_tokenizer_of_another_model, "the tokenizer has token id 199 but config.json "
                                                                "vocab_size=64"),
}


@pytest.fixture
def bad_dir(good_dir, tmp_path):
    def make(damage):
        path = tmp_path / "model"
        shutil.copytree(good_dir, path)
        damage(path)
        return path
    return make


def _snapshot(path: Path) -> dict:
    """Every file under `path` with its bytes: equal before and after means untouched."""
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(capsys, code: int, *expected: str) -> str:
    """Exit code 2 and exactly one stderr line, `error: ...` with every expected piece; returns the line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for piece in expected:
        assert piece in lines[0], lines[0]
    return lines[0]


def _gate_search(capsys, model_dir, run_dir, *extra, resume=False):
    argv = ["--config", str(GATE_RECIPE), "--override", f"model.path={model_dir}", "--override",
            f"run.run_dir={run_dir}", *[a for item in extra for a in ("--override", item)]]
    return _entry("gate_search").main(argv + (["--resume"] if resume else []))


@pytest.mark.parametrize("case", MODEL_DIR_CASES, ids=list(MODEL_DIR_CASES))
def test_gate_search_refuses_a_bad_model_dir_before_writing(case, bad_dir, tmp_path, capsys):
    damage, message = MODEL_DIR_CASES[case]
    model_dir = bad_dir(damage)
    code = _gate_search(capsys, model_dir, tmp_path / "run")
    line = _refused(capsys, code, message, str(model_dir))
    assert not (tmp_path / "run").exists(), line


@pytest.mark.parametrize("case", ["truncated_safetensors", "config_without_num_attention_heads",
                                  "config_of_another_model_heads", "tokenizer_of_another_model"])
@pytest.mark.parametrize("tool", ["export", "evaluate"])
def test_export_and_evaluate_refuse_a_bad_model_dir(tool, case, bad_dir, good_dir, tmp_path, capsys):
    damage, message = MODEL_DIR_CASES[case]
    model_dir = bad_dir(damage)
    out = tmp_path / "out"
    if tool == "export":
        argv = ["--model", str(model_dir), "--layout", str(good_dir / "hybrid.json"), "--out", str(out)]
    else:
        argv = ["--model", str(model_dir), "--out", str(out), "--retrieval-lengths", "64", "--samples", "2"]
    code = _entry(tool).main(argv)
    _refused(capsys, code, message, f"--model {model_dir}")
    assert not out.exists()


@pytest.mark.parametrize(("full_layers", "message"), [
    ([0, 99], "full_layers names layer 99, but layer_types describes 2 layers"),
    ([1], "full_layers=[1] disagrees with layer_types (which keep [0])"),
])
def test_export_refuses_a_layout_whose_full_layers_do_not_exist(full_layers, message, good_dir, tmp_path, capsys):
    layout = tmp_path / "hybrid.json"
    layout.write_text(json.dumps({"layer_types": ["full", "linear"], "full_layers": full_layers}))
    code = _entry("export").main(["--model", str(good_dir), "--layout", str(layout), "--out", str(tmp_path / "o")])
    _refused(capsys, code, message, str(layout))
    assert not (tmp_path / "o").exists()


# recipe-level cases of gate search: (extra files to write under tmp_path, overrides, expected message)
def _ds_json(text: str):
    return {"ds.json": text.encode()}, ["parallel.deepspeed_config={tmp}/ds.json"]


RECIPE_CASES = {
    "deepspeed_json_not_json": (*_ds_json("{zero_optimization: 3"), "is not valid JSON (line 1, column 2"),
    "deepspeed_json_not_an_object": (*_ds_json("[3]"), "holds a JSON list; it must be an object"),
    "deepspeed_json_bad_value": (*_ds_json('{"zero_optimization": {"stage": "three"}}'),
                                 "DeepSpeed refuses it (DeepSpeedZeroConfig stage: Input should be"),
    "text_corpus_empty": ({"corpus.txt": b"\n  \n"}, ["data.haystack=text", "data.text_files=[{tmp}/corpus.txt]"],
                          "hold no text (empty or blank files)"),
    "text_corpus_not_utf8": ({"corpus.txt": b"plain words \xff\xfe then more"},
                             ["data.haystack=text", "data.text_files=[{tmp}/corpus.txt]"],
                             "is not UTF-8 (bad byte near offset 12); re-encode it as UTF-8"),
}


@pytest.mark.parametrize("case", RECIPE_CASES, ids=list(RECIPE_CASES))
def test_gate_search_refuses_a_bad_recipe_input_before_writing(case, good_dir, tmp_path, capsys):
    files, overrides, message = RECIPE_CASES[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    code = _gate_search(capsys, good_dir, tmp_path / "run", *overrides)
    _refused(capsys, code, message)
    assert not (tmp_path / "run").exists()


def test_resume_of_a_run_dir_that_does_not_exist_is_refused(good_dir, tmp_path, capsys):
    code = _gate_search(capsys, good_dir, tmp_path / "typo", resume=True)
    _refused(capsys, code, f"--resume: run_dir {tmp_path / 'typo'} does not exist, so there is nothing to resume")
    assert not (tmp_path / "typo").exists()


def test_an_existing_run_dir_is_untouched_by_a_refused_resume(bad_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_2").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("earlier: run\n")
    (run_dir / "checkpoints" / "step_2" / "manifest.json").write_text("{}")
    before = _snapshot(run_dir)
    code = _gate_search(capsys, bad_dir(MODEL_DIR_CASES["truncated_safetensors"][0]), run_dir, resume=True)
    _refused(capsys, code, "model.safetensors is truncated")
    assert _snapshot(run_dir) == before


def _distill_argv(model_dir, run_dir, *extra):
    overrides = [f"model.path={model_dir}", f"student.layout={model_dir / 'hybrid.json'}", f"run.run_dir={run_dir}",
                 "text.weight=0", *extra]
    return ["--config", str(DISTILL_RECIPE), *[a for item in overrides for a in ("--override", item)]]


@pytest.mark.parametrize(("make_init_from", "message"), [
    (lambda tmp: tmp, "holds no summary.json, so it is not a finished distill run"),
    (lambda tmp: tmp / "missing", "does not exist; give the run.run_dir of a finished distill run"),
])
@pytest.mark.parametrize("stage", ["distill", "long_context"])
def test_init_from_that_is_not_a_run_is_refused(stage, make_init_from, message, good_dir, tmp_path, capsys):
    extra = [f"student.init_from={make_init_from(tmp_path)}"]
    if stage == "long_context":
        extra.append("distill.length_schedule=[{seq_len: 34, steps: 2}]")
    code = _entry(stage).main(_distill_argv(good_dir, tmp_path / "run", *extra))
    _refused(capsys, code, "student.init_from=", message)
    assert not (tmp_path / "run").exists()


def test_distill_refuses_a_bad_model_dir_before_writing(bad_dir, tmp_path, capsys):
    model_dir = bad_dir(MODEL_DIR_CASES["tokenizer_of_another_model"][0])
    code = _entry("distill").main(_distill_argv(model_dir, tmp_path / "run"))
    _refused(capsys, code, "the tokenizer has token id 199")
    assert not (tmp_path / "run").exists()


def test_the_good_inputs_pass_the_same_checks(good_dir):
    """Control: the undamaged directory and layout pass, so each case above fails for its one defect."""
    validate_recipe(load_recipe(GATE_RECIPE, [f"model.path={good_dir}"]))
    validate_distill_recipe(load_recipe(DISTILL_RECIPE, [f"model.path={good_dir}",
                                                         f"student.layout={good_dir / 'hybrid.json'}", "text.weight=0"],
                                        cls=DistillRecipe))


@pytest.mark.parametrize("entry", ["launcher/gate_search.py", "tools/export.py"])
def test_a_refusal_imports_neither_torch_nor_deepspeed(entry, bad_dir, good_dir, tmp_path):
    """The refusal comes before the heavy imports (about 5 s of them on a busy CPU box); checked by module, not by
    clock, so the test does not flake on a loaded machine."""
    model_dir = bad_dir(MODEL_DIR_CASES["truncated_safetensors"][0])
    if entry.startswith("launcher"):
        args = ["--config", str(GATE_RECIPE), "--override", f"model.path={model_dir}", "--override",
                f"run.run_dir={tmp_path / 'run'}"]
    else:
        args = ["--model", str(model_dir), "--layout", str(good_dir / "hybrid.json"), "--out", str(tmp_path / "o")]
    probe = ("import runpy, sys\n"
             f"sys.argv = [{str(ROOT / entry)!r}, *{args!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(ROOT / entry)!r}, run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    heavy = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
             "    print(stop.code, heavy)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "2 []", (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and "is truncated" in done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_safetensors_header_lengths_are_checked_without_reading_tensors(tmp_path):
    """A header that claims more data than the file holds is refused from the first 8 + N bytes."""
    from flashmorph.errors import ConfigError
    from flashmorph.model.hf_dir import read_safetensors_header

    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    with pytest.raises(ConfigError, match=r"is truncated \(\d+ bytes, its header needs \d+\)"):
        read_safetensors_header(path, "--model x")


def test_null_optional_keys_take_the_default_as_real_configs_write_them(good_dir, tmp_path):
    """Mistral writes "head_dim": null, older Llama configs omit num_key_value_heads: neither is an error."""
    from flashmorph.model.hf_dir import validate_model_dir

    model_dir = tmp_path / "model"
    shutil.copytree(good_dir, model_dir)
    _edit_config(model_dir, head_dim=None, intermediate_size=None, num_key_value_heads=2)
    assert validate_model_dir(model_dir).head_dim == 16


# ------------------------------------------------------------------ table-driven recipe, layout and tool cases
# each: (override, a piece of the one-line error); every recipe section, wrong types and wrong values
GATE_OVERRIDE_CASES = [
    ("search.steps=0", "search.steps=0 must be >= 1"),
    ("search.steps=abc", "search.steps='abc' must be int"),
    ("search.steps=[1, 2]", "search.steps=[1, 2] must be int"),
    ("search.lr=-1", "search.lr=-1.0 must be > 0"),
    ("search.lr=0", "search.lr=0.0 must be > 0"),
    ("search.micro_batch_size=0", "search.micro_batch_size=0 must be >= 1"),
    ("search.grad_accum_steps=0", "search.grad_accum_steps=0 must be >= 1"),
    ("search.budget=-1", "search.budget=-1 must be >= 0"),
    ("search.budget=99", "search.budget=99 exceeds the 2 layers; give at most 2, or a fraction in [0, 1]"),
    ("search.regularizer=foo", "search.regularizer='foo' is unknown; use one of"),
    ("search.save_every=-1", "search.save_every=-1 must be >= 0"),
    ("search.keep_last=-1", "search.keep_last=-1 must be >= 0"),
    ("search.log_every=0", "search.log_every=0 must be >= 1"),
    ("search.max_bad_steps=0", "search.max_bad_steps=0 must be >= 1"),
    ("search.max_bad_steps=x", "search.max_bad_steps='x' must be int"),
    ("search.reg_warmup_steps=-3", "search.reg_warmup_steps=-3 must be >= 0"),
    ("search.weight_decay=-1", "search.weight_decay=-1.0 must be >= 0"),  # a traceback after writing, before
    ("search.grad_clip=-1", "search.grad_clip=-1.0 must be >= 0"),
    ("search.reg_weight=-1", "search.reg_weight=-1.0 must be >= 0"),
    ("search.stepz=3", "unknown field search.stepz; valid fields:"),
    ("model.dtype=float8", "model.dtype='float8' is unknown; use one of"),
    ("model.path=/nonexistent", "model.path=/nonexistent does not exist; give a local HF model directory"),
    ("model.activation_checkpointing=maybe", "model.activation_checkpointing='maybe' must be bool"),
    ("morph.gate_granularity=neuron", "morph.gate_granularity='neuron' is unknown; use 'layer' or 'head'"),
    ("morph.softmax_impl=flash9", "morph.softmax_impl='flash9' is unknown; use one of"),
    ("morph={a: 1}", "unknown field morph.a; valid fields:"),
    ("data.seq_len=0", "data.seq_len=0 must be >= 1"),
    ("data.seq_len=-5", "data.seq_len=-5 must be >= 1"),
    ("data.seq_len=1.5", "data.seq_len=1.5 must be int"),
    ("data.num_pairs=0", "data.num_pairs=0 must be >= 1"),
    ("data.haystack=foo", "data.haystack='foo' is unknown; use one of"),
    ("data.tasks={bogus: 1.0}", "data.tasks has unknown task 'bogus'; use any of"),
    ("parallel.zero_stage=5", "parallel.zero_stage=5 must be 0, 1, 2 or 3"),
    ("parallel.deepspeed_config=/missing.json", "parallel.deepspeed_config=/missing.json does not exist"),
    ("run.seed=abc", "run.seed='abc' must be int"),
    ("search.steps", "--override 'search.steps' must look like section.field=value"),
    ("nosection.x=3", "unknown field nosection; valid fields:"),
    ("search=3", "search must be a mapping of fields, got 3"),
]


@pytest.mark.parametrize(("override", "message"), GATE_OVERRIDE_CASES, ids=[c[0] for c in GATE_OVERRIDE_CASES])
def test_gate_search_refuses_a_bad_recipe_value(override, message, good_dir, tmp_path, capsys):
    code = _gate_search(capsys, good_dir, tmp_path / "run", override)
    _refused(capsys, code, message)
    assert not (tmp_path / "run").exists()


# (world size the launcher was given, override, message): gate search checks its layout like distillation
GATE_PARALLEL_CASES = [
    (3, "parallel.sequence_parallel=3", "parallel.sequence_parallel=3 does not divide the model's num_heads=4 "
                                        "(4 attention heads per TP rank); choose degrees whose product divides 4"),
    (3, "parallel.tensor_parallel=3", "parallel.tensor_parallel=3 does not divide the model's num_heads=4 "
                                      "(attention heads); use a divisor of 4"),
    (1, "parallel.tensor_parallel=2", "world_size=1 is not divisible by parallel.tensor_parallel=2 x "
                                      "parallel.sequence_parallel=1 = 2; launch a multiple of 2 ranks"),
]


@pytest.mark.parametrize(("world", "override", "message"), GATE_PARALLEL_CASES,
                         ids=[f"{w}:{o}" for w, o, _ in GATE_PARALLEL_CASES])
def test_gate_search_refuses_an_impossible_parallel_layout(world, override, message, good_dir, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = _gate_search(capsys, good_dir, tmp_path / "run", override)
    _refused(capsys, code, message)
    assert not (tmp_path / "run").exists()


DISTILL_OVERRIDE_CASES = [
    ("distill.temperature=0", "distill.temperature=0.0 must be > 0"),
    ("distill.weight_decay=-1", "distill.weight_decay=-1.0 must be >= 0"),
    ("distill.grad_clip=-2", "distill.grad_clip=-2.0 must be >= 0"),
    ("distill.ce_weight=-1", "distill.ce_weight=-1.0 must be >= 0"),
    ("distill.lr=0", "distill.lr=0.0 must be > 0"),
    ("distill.micro_batch_size=0", "distill.micro_batch_size=0 must be >= 1"),
    ("distill.token_chunk=0", "distill.token_chunk=0 must be >= 1"),
    ("distill.vocab_chunk=0", "distill.vocab_chunk=0 must be >= 1"),
    ("distill.trainable=bogus", "distill.trainable='bogus' is unknown; use one of"),
    ("distill.lora_rank=0", "distill.lora_rank must be >= 1 and distill.lora_targets non-empty"),
    ("distill.lora_targets=[]", "distill.lora_rank must be >= 1 and distill.lora_targets non-empty"),
    ("distill.max_bad_steps=0", "distill.max_bad_steps=0 must be >= 1"),
    ("distill.steps=0", "distill.steps=0 must be >= 1"),
    ("distill.save_every=-1", "distill.save_every=-1 must be >= 0"),
    ("distill.keep_last=-2", "distill.keep_last=-2 must be >= 0"),
    ("distill.warmup_steps=-1", "distill.warmup_steps=-1 must be >= 0"),
    ("distill.length_schedule=[{seq_len: 0, steps: 1}]", "distill.length_schedule[0]: lengths must increase"),
    ("student.layout=/missing.json", "student.layout=/missing.json does not exist; write it with"),
    ("text.weight=-1", "text.weight=-1.0 must lie in [0, 1]"),
    ("morph.gate_granularity=head", "morph.gate_granularity must be 'layer' for distillation"),
]


@pytest.mark.parametrize(("override", "message"), DISTILL_OVERRIDE_CASES, ids=[c[0] for c in DISTILL_OVERRIDE_CASES])
def test_distill_refuses_a_bad_recipe_value(override, message, good_dir, tmp_path, capsys):
    code = _entry("distill").main(_distill_argv(good_dir, tmp_path / "run", override))
    _refused(capsys, code, message)
    assert not (tmp_path / "run").exists()


def test_distill_refuses_a_layout_made_for_another_layer_count(good_dir, tmp_path, capsys):
    layout = tmp_path / "layout3.json"
    layout.write_text(json.dumps({"layer_types": ["full", "linear", "linear"]}))
    code = _entry("distill").main(_distill_argv(good_dir, tmp_path / "run", f"student.layout={layout}"))
    _refused(capsys, code, "has 3 layers but the model has 2; use the layout made for this model")
    assert not (tmp_path / "run").exists()


# (world size the launcher was given, override, message): TP x SP that cannot tile the world or the heads
PARALLEL_CASES = [
    (4, "parallel.tensor_parallel=3", "world_size=4 is not divisible by parallel.tensor_parallel=3 x "
                                      "parallel.sequence_parallel=1 = 3; launch a multiple of 3 ranks"),
    (4, "parallel.sequence_parallel=3", "world_size=4 is not divisible by parallel.tensor_parallel=1 x "
                                        "parallel.sequence_parallel=3"),
    (4, "parallel.tensor_parallel=8", "launch a multiple of 8 ranks or lower the degrees"),
    (2, "parallel.sequence_parallel=4", "world_size=2 is not divisible by parallel.tensor_parallel=1 x parallel.sequence_parallel=4 = 4; launch a multiple of 4 ranks"),
    (4, "parallel.layouts={4: {tensor_parallel: 8}}", "launch a multiple of 8 ranks"),
    (4, "parallel.layouts={4: {tensor_parallel: 2, sequence_parallel: 4}}", "= 8; launch a multiple of 8 ranks"),
    (4, "parallel.tensor_parallel=4", "parallel.tensor_parallel=4 exceeds the model's num_kv_heads=2"),
    (4, "parallel.tensor_parallel=0", "parallel.tensor_parallel=0 must be an int >= 1"),
]


@pytest.mark.parametrize(("world", "override", "message"), PARALLEL_CASES, ids=[f"{w}:{o}" for w, o, _ in PARALLEL_CASES])
def test_distill_refuses_an_impossible_parallel_layout(world, override, message, good_dir, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = _entry("distill").main(_distill_argv(good_dir, tmp_path / "run", override))
    _refused(capsys, code, message)
    assert not (tmp_path / "run").exists()


# (tool, argv with {model}/{tmp} placeholders, message); the tmp dir must be unchanged afterwards
TOOL_CASES = [
    ("reshard", "--from hf --to tp --src {tmp}/missing --dst {tmp}/o --tp 2", "is not a directory"),
    ("reshard", "--from hf --to tp --src {model} --dst {tmp}/o --tp 0", "--tp must be an int >= 1, got 0"),
    ("reshard", "--from hf --to tp --src {model} --dst {tmp}/o --tp 3", "--tp=3 does not divide the model's num_heads=4 (attention heads); use a divisor of 4"),
    ("reshard", "--from hf --to tp --src {model} --dst {tmp}/full --tp 2", "exists and is not empty; pass --force"),
    ("reshard", "--from zero3 --to hf --src {model} --dst {tmp}/o", "is not one DeepSpeed checkpoint"),
    ("reshard", "--from hf --to zero3 --src {model} --dst {tmp}/o --dp 0", "--dp must be an int >= 1, got 0"),
    ("reshard", "--from hf --to hf --src {model} --dst {tmp}/o --max-shard-size lots", "is not a size; write e.g."),
    ("reshard", "--from hf --to tp --src {model} --dst {tmp}/o", "--to tp needs --tp N"),
    ("estimate", "--gpus 0 --preset llama3-70b", "gpus=0 must be a positive integer"),
    ("estimate", "--model-dir {tmp}/missing", "holds no config.json; point it at a HF model directory"),
    ("estimate", "--model-dir {model} --tp 3", "gpus=1 is not divisible by tensor_parallel=3 x sequence_parallel=1 = 3; launch a multiple of 3 ranks"),
    ("estimate", "--model-dir {model} --sp 3", "gpus=1 is not divisible by tensor_parallel=1 x sequence_parallel=3 = 3; launch a multiple of 3 ranks"),
    ("estimate", "--model-dir {model} --gpus 4 --tp 8", "gpus=4 is not divisible"),
    ("estimate", "--model-dir {model} --gpus 3 --tp 2", "gpus=3 is not divisible"),
    ("estimate", "--model-dir {model} --seq-len 0", "seq_len=0 must be a positive integer"),
    ("estimate", "--model-dir {model} --micro-batch 0", "micro_batch=0 must be a positive integer"),
    ("estimate", "--model-dir {model} --grad-accum 0", "grad_accum=0 must be a positive integer"),
    ("estimate", "--model-dir {model} --full-layers 0,9", "--full-layers '0,9' must be an integer or 'mixed'"),
    ("estimate", "--recipe {tmp}/missing.yaml", "is not readable (No such file or directory); give a recipe"),
    ("discretize_gates", "--gates {tmp}/missing.safetensors --budget 1 --out {tmp}/h.json", "does not exist; point"),
    ("discretize_gates", "--gates {tmp}/garbage.safetensors --budget 1 --out {tmp}/h.json",
     "corrupted or truncated safetensors file"),
    ("discretize_gates", "--gates {model}/model.safetensors --budget abc --out {tmp}/h.json",
     "--budget='abc' must be a count"),
    ("discretize_gates", "--gates {model}/model.safetensors --budget 1 --out {tmp}/h.json",
     "holds no 'gate_values' tensor"),
    ("discretize_gates", "--gates {model}/model.safetensors --budget 1 --out {tmp}/exists.json",
     "already exists; pass --force"),
    ("discretize_gates", "--method threshold --gates {model}/model.safetensors --out {tmp}/h.json",
     "--method threshold needs --threshold"),
    ("discretize_gates", "--method random --budget 1 --out {tmp}/h.json", "--method random needs the layer count"),
    ("discretize_gates", "--method leave_one_out --budget 1 --out {tmp}/h.json", "--method leave_one_out needs --recipe"),
    ("discretize_gates", "--gates {model}/model.safetensors --budget 1 --level head --heads-per-layer 1 --out "
                         "{tmp}/h.json", "give --budget (heads overall) or --heads-per-layer, not both"),
]


@pytest.mark.parametrize(("tool", "argv", "message"), TOOL_CASES, ids=[f"{t}:{a}" for t, a, _ in TOOL_CASES])
def test_tools_refuse_bad_arguments_and_write_nothing(tool, argv, message, good_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "garbage.safetensors").write_bytes(b"nonsense")
    (tmp_path / "exists.json").write_text("{}")
    before, model_before = _snapshot(tmp_path), _snapshot(good_dir)
    try:
        code = _entry(tool).main(argv.format(model=good_dir, tmp=tmp_path).split())
    except SystemExit as stop:  # argparse's own refusals (one `error:` line too) exit from inside main
        code = stop.code
    _refused(capsys, code, message)
    assert _snapshot(tmp_path) == before and _snapshot(good_dir) == model_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.json", "full", "garbage.safetensors"]
