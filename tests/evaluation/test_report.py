"""Report: results.json reads back equal, results.md tables show the same numbers, files replace atomically."""

import re

import pytest

from flashmorph.data import DataConfig, TokenSpace
from flashmorph.errors import FlashMorphError
from flashmorph.evaluation import RetrievalEvalConfig, evaluate_retrieval, read_report, to_markdown, write_report
from flashmorph.evaluation.report import RESULTS_JSON, RESULTS_MD


@pytest.fixture(scope="module")
def results(tiny_model):
    cfg = RetrievalEvalConfig(tasks=["mqar", "niah_single"], lengths=[32, 48], samples=3, batch_size=3,
                              data=DataConfig(num_pairs=2))
    retrieval = evaluate_retrieval(tiny_model, TokenSpace.synthetic(64), cfg, show_progress=False)
    perplexity = {"perplexity": 61.25, "mean_nll": 4.115, "scored_tokens": 199, "corpus_tokens": 200, "windows": 1,
                  "config": {"text_files": ["a.txt"], "text_field": "text", "window": 256, "stride": None,
                             "batch_size": 4, "max_tokens": 200}}
    lm_eval = {"tasks": {"piqa": {"acc": 0.5, "acc_stderr": 0.01}}, "samples": {}, "lm_eval_version": "0.4.13",
               "config": {}}
    return {"model": "tiny", "retrieval": retrieval, "perplexity": perplexity, "lm_eval": lm_eval,
            "meta": {"dtype": "auto", "device": "cpu", "seconds": {"load": 0.1}, "versions": {"torch": "x"}}}


def markdown_rows(markdown: str, section: str) -> dict[str, list[str]]:
    """The body of the first table under the heading `## {section}`: first cell -> the other cells."""
    lines = markdown.splitlines()
    heading = lines.index(f"## {section}")
    start = next(i for i in range(heading, len(lines)) if lines[i].startswith("|"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_json_round_trip_and_markdown_tables(tmp_path, results):
    json_path, md_path = write_report(results, tmp_path / "out")
    assert json_path.name == RESULTS_JSON and md_path.name == RESULTS_MD
    assert read_report(tmp_path / "out") == results
    markdown = md_path.read_text()
    assert markdown == to_markdown(results)
    retrieval = results["retrieval"]
    rows = markdown_rows(markdown, "Retrieval recall")
    for cell in retrieval["cells"]:
        column = [32, 48].index(cell["seq_len"])
        accuracy, exact = map(float, re.fullmatch(r"(\S+) / (\S+)", rows[cell["task"]][column]).groups())
        assert accuracy == pytest.approx(100 * cell["token_accuracy"], abs=0.05)
        assert exact == pytest.approx(100 * cell["exact_match"], abs=0.05)
    overall = retrieval["overall"]
    assert rows["all"][-1] == f"{100 * overall['token_accuracy']:.1f} / {100 * overall['exact_match']:.1f}"
    assert markdown_rows(markdown, "Perplexity")["61.2500"][:2] == ["4.1150", "199"]
    assert markdown_rows(markdown, "lm-eval")["piqa"] == ["acc", "0.5000", "0.0100"]


def test_rewrite_replaces_both_files(tmp_path, results):
    write_report(results, tmp_path)
    write_report({"model": "other"}, tmp_path)
    assert read_report(tmp_path) == {"model": "other"}
    assert "## Retrieval" not in (tmp_path / RESULTS_MD).read_text()
    assert [p.name for p in sorted(tmp_path.iterdir())] == [RESULTS_JSON, RESULTS_MD]  # no temp files left


def test_out_that_is_a_file_and_missing_report_are_clear_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlashMorphError, match="is a file"):
        write_report({}, tmp_path / "file")
    with pytest.raises(FlashMorphError, match="does not exist"):
        read_report(tmp_path / "nowhere")
