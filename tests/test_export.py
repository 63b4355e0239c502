"""Export: a hybrid written as a standard HF directory loads with one call, gives the same logits as the
in-memory hybrid, generates, holds no pickle, and never overwrites a directory it was not asked to."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import flashmorph
from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.export import export_hybrid
from flashmorph.model.config import MorphConfig
from flashmorph.model.hybrid import apply_hybrid_layout
from flashmorph.model.tiny import build_tiny_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ["linear", "full", "linear", "linear"]


def _source_model():
    return build_tiny_model(tiny_config("qwen3", num_layers=4), seed=5)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A tiny Qwen3 HF directory with a word-level tokenizer, and its hybrid.json next to it."""
    path = tmp_path_factory.mktemp("source")
    _source_model().save_pretrained(path / "model")
    vocab = {f"w{i}": i for i in range(64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w3").save_pretrained(path / "model")
    (path / "hybrid.json").write_text(json.dumps({"layer_types": LAYOUT, "method": "gates"}))
    return path


def test_export_then_load_gives_the_in_memory_hybrid(source_dir, tmp_path):
    morph = MorphConfig(decay_normalizer=8.0)
    out = export_hybrid(source_dir / "model", source_dir / "hybrid.json", tmp_path / "export", morph_config=morph)
    loaded = flashmorph.load_hybrid(out)
    in_memory = apply_hybrid_layout(_source_model(), LAYOUT, morph)
    ids = torch.randint(3, 64, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, in_memory(ids, use_cache=False).logits)
        generated = loaded.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert torch.equal(generated, in_memory.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None))
    assert generated.shape == (2, 30)

    config = json.loads((out / "config.json").read_text())
    assert config["flashmorph"]["layer_types"] == LAYOUT
    assert config["flashmorph"]["morph"]["decay_normalizer"] == 8.0
    assert config["flashmorph"]["version"] == flashmorph.__version__
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "manifest.json", "versions.json"} <= names
    assert all(p.suffix in (".json", ".safetensors") for p in out.iterdir()), names  # no pickle anywhere
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == names - {"manifest.json"}
    assert AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]


def test_load_hybrid_casts_to_the_requested_dtype(source_dir, tmp_path):
    out = export_hybrid(source_dir / "model", LAYOUT, tmp_path / "export", dtype="bfloat16")
    loaded = flashmorph.load_hybrid(out)
    assert loaded.dtype == torch.bfloat16
    assert flashmorph.load_hybrid(out, dtype=torch.float32).dtype == torch.float32
    assert loaded.generate(torch.randint(3, 64, (1, 5)), max_new_tokens=3, do_sample=False).shape[1] >= 6


def test_export_refuses_a_non_empty_directory_unless_forced(source_dir, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty.*--force"):
        export_hybrid(source_dir / "model", LAYOUT, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_hybrid(source_dir / "model", LAYOUT, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging or old copy left behind


def test_load_hybrid_refuses_a_plain_model_directory(source_dir):
    with pytest.raises(FlashMorphError, match="not a flashmorph hybrid"):
        flashmorph.load_hybrid(source_dir / "model")


def _export_cli():
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_reports_bad_input_in_one_line(source_dir, tmp_path, capsys):
    main = _export_cli()
    model, layout = str(source_dir / "model"), str(source_dir / "hybrid.json")
    wrong_length = tmp_path / "three_layers.json"
    wrong_length.write_text(json.dumps({"layer_types": ["full", "linear", "full"]}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    fresh = str(tmp_path / "a")
    cases = {
        "does not exist": ["--model", model, "--layout", str(tmp_path / "nope.json"), "--out", fresh],
        "has 3 layers but the model has 4": ["--model", model, "--layout", str(wrong_length), "--out", fresh],
        "holds no config.json": ["--model", str(tmp_path), "--layout", layout, "--out", fresh],
        "is not empty": ["--model", model, "--layout", layout, "--out", str(taken)],
        "--dtype='fp8' is unknown": ["--model", model, "--layout", layout, "--out", fresh, "--dtype", "fp8"],
    }
    for message, argv in cases.items():
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "a").exists()
    assert main(["--model", model, "--layout", layout, "--out", fresh]) == 0
    assert flashmorph.load_hybrid(tmp_path / "a").config.flashmorph["layer_types"] == LAYOUT
