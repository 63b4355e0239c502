"""lm-eval adapter: log-likelihoods equal a direct computation, a local multiple-choice task runs end to end
through lm_eval.simple_evaluate (no download), and a missing lm_eval is a one-line pip hint."""

import json
import sys

import pytest
import torch

from flashmorph.errors import ConfigError, FlashMorphError
from flashmorph.evaluation import LMEvalConfig, evaluate_lm_eval, make_lm
from flashmorph.evaluation.lm_eval_adapter import adapter_class, check_tasks

PAIRS = [("the cat is", " 3"), ("a dog = 4 and the owl is", " 7 on the mat"), ("", "the fox"), ("key", " is")]
DOCS = [  # PIQA-shaped: a goal and two solutions
    {"goal": "the cat", "sol1": "is 3", "sol2": "= fig", "label": 0},
    {"goal": "a dog", "sol1": "on the pear", "sol2": "is 12", "label": 1},
    {"goal": "key 4", "sol1": "is kiwi", "sol2": "? owl", "label": 0},
]


def instance(request_type: str, arguments: tuple):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=0)


@torch.no_grad()
def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation tokens | context), continuation tokens = encode(context + cont) minus
    encode(context); an empty context is BOS."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False) if context else []
    continuation_ids = whole[len(context_ids):]
    ids = torch.tensor(([tokenizer.bos_token_id] if not context else []) + whole)
    logp = model(input_ids=ids[None]).logits[0].log_softmax(-1)
    positions = range(len(ids) - len(continuation_ids) - 1, len(ids) - 1)
    picked = [logp[p, t] for p, t in zip(positions, continuation_ids)]
    greedy = all(logp[p].argmax() == t for p, t in zip(positions, continuation_ids))
    return float(sum(picked)), bool(greedy)


def test_loglikelihood_equals_direct_computation(tiny_model, word_tokenizer):
    pytest.importorskip("lm_eval")
    lm = make_lm(tiny_model, word_tokenizer, batch_size=3, show_progress=False)  # 4 requests: a batch of 3, then 1
    results = lm.loglikelihood([instance("loglikelihood", pair) for pair in PAIRS], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results, strict=True):
        expected, expected_greedy = direct_loglikelihood(tiny_model, word_tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy


def test_loglikelihood_rolling_equals_direct_sum(tiny_model, word_tokenizer):
    pytest.importorskip("lm_eval")
    text = "the cat is 3 and the dog = 4 on a fig key is 12 the owl ? 5"
    ids = [word_tokenizer.bos_token_id] + word_tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():  # one window: the whole text after BOS
        logp = tiny_model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    whole = float(sum(logp[p, ids[p + 1]] for p in range(len(ids) - 1)))
    long_lm = make_lm(tiny_model, word_tokenizer, batch_size=2, show_progress=False)
    assert long_lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])[0] == pytest.approx(
        whole, abs=1e-4)
    # windows of 6 tokens: every token is still scored once, each window run on its own must give the same sum
    from lm_eval import utils

    short_lm = make_lm(tiny_model, word_tokenizer, batch_size=4, max_length=6, show_progress=False)
    by_window = 0.0
    for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            ids[1:], word_tokenizer.bos_token_id, 6, 1)):
        window = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = tiny_model(input_ids=window[:, :-1]).logits[0].log_softmax(-1)
        by_window += float(sum(logp[-len(continuation) + i, t] for i, t in enumerate(continuation)))
    assert short_lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])[0] == pytest.approx(
        by_window, abs=1e-4)


def test_generate_until_is_refused_clearly(tiny_model, word_tokenizer):
    pytest.importorskip("lm_eval")
    with pytest.raises(NotImplementedError, match="log-likelihoods only"):
        make_lm(tiny_model, word_tokenizer).generate_until([instance("generate_until", ("the", {}))])


def test_local_multiple_choice_task_end_to_end(tmp_path, tiny_model, word_tokenizer):
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny_piqa.jsonl"
    data.write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n")
    (tmp_path / "tiny_piqa.yaml").write_text(
        "task: tiny_piqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\noutput_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "{{goal}}"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    cfg = LMEvalConfig(tasks=["tiny_piqa"], include_path=str(tmp_path), include_defaults=False, batch_size=4)
    result = evaluate_lm_eval(tiny_model, word_tokenizer, cfg, show_progress=False)
    # lm-eval's multiple choice: target_delimiter " " between question and choice, argmax of the log-likelihoods
    correct = 0
    for doc in DOCS:
        scores = [direct_loglikelihood(tiny_model, word_tokenizer, doc["goal"], " " + doc[key])[0]
                  for key in ("sol1", "sol2")]
        correct += int(max(range(2), key=scores.__getitem__) == doc["label"])
    assert result["tasks"]["tiny_piqa"]["acc"] == pytest.approx(correct / len(DOCS))
    with pytest.raises(ConfigError, match="'piqa' is unknown"):
        check_tasks(LMEvalConfig(tasks=["piqa"], include_path=str(tmp_path), include_defaults=False))


def test_missing_lm_eval_is_a_pip_hint(monkeypatch, tiny_model, word_tokenizer):
    adapter_class.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    try:
        with pytest.raises(FlashMorphError, match="pip install lm-eval"):
            make_lm(tiny_model, word_tokenizer)
    finally:
        adapter_class.cache_clear()
