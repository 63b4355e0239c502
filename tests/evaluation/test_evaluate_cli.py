"""tools/evaluate.py end to end on a tiny model directory; bad input is one `error:` line, exit 2, no weights read."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashmorph.cli import evaluate as evaluate_tool
from flashmorph.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "evaluate.py"


def test_end_to_end(tmp_path, model_dir, corpus_file, capsys):
    out = tmp_path / "eval"
    rc = evaluate_tool.main([
        "--model", str(model_dir), "--out", str(out), "--device", "cpu", "--no-progress",
        "--retrieval-lengths", "40,64", "--tasks", "mqar,niah_single", "--samples", "3", "--batch-size", "3",
        "--num-pairs", "2", "--text-files", str(corpus_file), "--ppl-window", "64", "--ppl-max-tokens", "150",
    ])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [(c["task"], c["seq_len"]) for c in results["retrieval"]["cells"]] == [
        ("mqar", 40), ("niah_single", 40), ("mqar", 64), ("niah_single", 64)]
    assert all(0.0 <= c["token_accuracy"] <= 1.0 for c in results["retrieval"]["cells"])
    assert results["perplexity"]["corpus_tokens"] == 150 and results["perplexity"]["perplexity"] > 1.0
    assert results["meta"]["model_type"] == "llama" and results["meta"]["versions"]["torch"]
    markdown = (out / "results.md").read_text()
    assert "## Retrieval recall" in markdown and "## Perplexity" in markdown
    assert capsys.readouterr().out.strip() == markdown.strip()


@pytest.mark.parametrize("argv, message", [
    (["--retrieval-lengths", "8"], "too short for task mqar"),
    (["--retrieval-lengths", "4Q"], "is not a length"),
    (["--retrieval-lengths", "64", "--tasks", "needle"], "unknown"),
    (["--text-files", "nowhere.txt"], "does not exist"),
    ([], "nothing to evaluate"),
    (["--retrieval-lengths", "64", "--haystack", "text"], "--haystack text needs --text-files"),
    (["--retrieval-lengths", "64", "--dtype", "float8"], "--dtype"),
])
def test_bad_input_fails_before_loading_weights(tmp_path, model_dir, monkeypatch, capsys, argv, message):
    import flashmorph.evaluation.suite as suite

    monkeypatch.setattr(suite, "load_eval_model", lambda *a, **k: pytest.fail("weights loaded despite bad input"))
    rc = evaluate_tool.main(["--model", str(model_dir), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_model_without_config_is_refused(tmp_path, capsys):
    rc = evaluate_tool.main(["--model", str(tmp_path), "--out", str(tmp_path / "out"), "--retrieval-lengths", "64"])
    assert rc == 2 and "holds no config.json" in capsys.readouterr().err


def test_perplexity_needs_a_tokenizer(tmp_path, bare_model_dir, corpus_file, capsys):
    rc = evaluate_tool.main(["--model", str(bare_model_dir), "--out", str(tmp_path / "out"),
                             "--text-files", str(corpus_file)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "has no tokenizer" in err


def test_argument_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--model", str(tmp_path), "--out", str(tmp_path),
                           "--samples", "many"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_lm_eval_flags_build_the_adapter_config(tmp_path):
    args = evaluate_tool.parse_args(["--model", "m", "--out", str(tmp_path), "--lm-eval", "piqa, arc_easy",
                                     "--lm-eval-limit", "10", "--lm-eval-fewshot", "0", "--device", "cpu"])
    cfg = evaluate_tool.build_config(args).lm_eval
    assert (cfg.tasks, cfg.limit, cfg.num_fewshot, cfg.include_defaults) == (["piqa", "arc_easy"], 10, 0, True)


def test_missing_lm_eval_fails_before_loading_weights(tmp_path, model_dir, monkeypatch, capsys):
    import flashmorph.evaluation.suite as suite

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.setattr(suite, "load_eval_model", lambda *a, **k: pytest.fail("weights loaded despite bad input"))
    rc = evaluate_tool.main(["--model", str(model_dir), "--out", str(tmp_path / "out"), "--lm-eval", "piqa"])
    assert rc == 2 and capsys.readouterr().err.strip() == "error: lm-eval is not installed; pip install lm-eval"


def test_recipe_sets_the_sample_format(tmp_path):
    recipe = str(ROOT / "recipes" / "embedded.yaml")
    args = evaluate_tool.parse_args(["--model", "m", "--out", str(tmp_path), "--recipe", recipe, "--device", "cpu",
                                     "--retrieval-lengths", "34,1K", "--override", "data.value_len=2", "--seed", "7"])
    cfg = evaluate_tool.build_config(args).retrieval
    assert (cfg.tasks, cfg.lengths) == (["mqar"], [34, 1024])
    assert (cfg.data.kv_separator, cfg.data.num_pairs, cfg.data.value_len, cfg.data.seed) == (False, 8, 2, 7)
    bad = evaluate_tool.parse_args(["--model", "m", "--out", str(tmp_path), "--recipe", recipe, "--device", "cpu",
                                    "--retrieval-lengths", "34", "--override", "search.steps=1"])
    with pytest.raises(ConfigError, match="only the data section"):
        evaluate_tool.build_config(bad)
