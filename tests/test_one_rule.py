"""Each rule has one home, found by one grep: the model shape is read from a HF config only in model/shape.py, and
a TP x SP x DP layout is checked against a model only in parallel/layout.py. A second copy fails here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("flashmorph", "bench", "launcher", "tools")

# (what the rule is, a pattern only its home may hold, the files allowed to hold it)
RULES = [
    ("the HF config keys of a model's heads", re.compile(r"num_attention_heads|num_key_value_heads"),
     # hf_dir.py only names the keys in its weight-shape error messages
     {"flashmorph/model/shape.py", "flashmorph/model/hf_dir.py"}),
    ("reading optional config keys with getattr", re.compile(r"getattr\(\w+, \"(head_dim|num_key_value_heads)\""),
     set()),
    ("the layout's fit to a model", re.compile(r"does not divide the (model|sequence)|must divide one another|"
                                                 r"attention heads per TP rank|exceeds the model's num_kv_heads"),
     {"flashmorph/parallel/layout.py"}),
    ("world size against TP x SP", re.compile(r"is not divisible by \{?\w*\.?(tensor|_TP)"),
     {"flashmorph/parallel/layout.py"}),
    ("per-head gates under tensor parallelism", re.compile(r"gate_granularity=head cannot run"),
     {"flashmorph/parallel/layout.py"}),
    ("the full-attention budget", re.compile(r"as a fraction must lie in|round\(budget|budget \* \w+ \+ 0\.5"),
     {"flashmorph/config/validate.py"}),
]


def holders(pattern: re.Pattern, root: Path = ROOT) -> set[str]:
    """The files under CODE_DIRS with a line matching `pattern`."""
    found = set()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if any(pattern.search(line) for line in path.read_text(encoding="utf-8").splitlines()):
                found.add(path.relative_to(root).as_posix())
    return found


@pytest.mark.parametrize("what, pattern, homes", RULES, ids=[rule[0] for rule in RULES])
def test_each_rule_lives_in_one_place(what, pattern, homes):
    extra = sorted(holders(pattern) - homes)
    assert not extra, f"{what} belongs in {sorted(homes)}; move these copies there: {extra}"
    if homes:
        assert holders(pattern) & homes, f"{what}: the pattern no longer finds its home, so this test checks nothing"


def test_the_scan_finds_a_copy(tmp_path):
    (tmp_path / "tools").mkdir()
    copies = ['heads = cfg.num_attention_heads', 'd = getattr(cfg, "head_dim", None)',
              'fail(f"gpus={n} is not divisible by tensor_parallel x sequence_parallel")']
    (tmp_path / "tools" / "x.py").write_text("\n".join(copies) + "\n")
    assert [what for what, pattern, _ in RULES if holders(pattern, tmp_path) == {"tools/x.py"}] == [
        RULES[0][0], RULES[1][0], RULES[3][0]]
