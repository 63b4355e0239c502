"""Shared by the data tests: a tiny word-level HF tokenizer built in memory (no download) and layout parsers."""

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
MARKER_WORDS = ["is", "?", "=", "key"]  # what TokenSpace.from_tokenizer can pick as SEP, QUERY, ASSIGN, NEEDLE
KEY_WORDS = (  # lowercase words of >= 3 letters: what TokenSpace.from_tokenizer takes as keys
    "cat dog owl fox bee ant elk yak emu hen ram cow pig bat eel cod apple pear plum lime fig kiwi date grape melon"
    " peach mango lemon"
).split()
NUMBERS = [str(n) for n in range(40)]
FILLER_WORDS = ["The", "A", "of", "to", "in", "a", ".", ",", "And", "It", "we", "on"]
WORDS = SPECIALS + MARKER_WORDS + KEY_WORDS + NUMBERS + FILLER_WORDS


def build_word_tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


IGNORE = -100


def expected_labels(task: str, input_ids, space, cfg) -> tuple[list[int], set[int]]:
    """Read a sample back by its documented layout alone and return (the labels it must carry, the positions of its
    structural tokens: BOS, markers, keys, values, question). Asserts on the layout along the way."""
    ids = input_ids.tolist()
    sep, query, needle, assign = space.kv_sep_id, space.query_id, space.needle_id, space.assign_id
    values_pool = set(space.value_ids.tolist())
    vl = cfg.value_len
    assert ids[0] == space.bos_id
    assert ids.count(query) == 1, "exactly one QUERY marker"
    q = ids.index(query)
    labels = [IGNORE] * len(ids)
    structural = {0, *range(q, len(ids))}

    def label(start: int, answer: list[int]):
        assert ids[start : start + len(answer)] == answer, "answer tokens in the question section"
        labels[start : start + len(answer)] = answer

    if task == "mqar":
        pairs = {}
        for j in range(1, q):
            if ids[j] == sep:
                assert ids[j - 1] not in pairs, "keys distinct"
                pairs[ids[j - 1]] = ids[j + 1 : j + 1 + vl]
                structural |= set(range(j - 1, j + 1 + vl))
        assert len(pairs) == cfg.num_pairs
        row = 2 + vl
        assert (len(ids) - q - 1) == cfg.queries_per_sample * row
        asked = []
        for r in range(cfg.queries_per_sample):
            start = q + 1 + r * row
            key = ids[start]
            assert ids[start + 1] == sep
            asked.append(key)
            label(start + 2, pairs[key])
        assert len(set(asked)) == len(asked), "each key asked at most once"
        return labels, structural

    needles = []  # (position, name, rhs tokens)
    for j in range(1, q):
        if ids[j] == needle:
            marker = assign if task == "variable_tracking" else sep
            assert ids[j + 2] == marker
            width = vl if (task != "variable_tracking" or ids[j + 3] in values_pool) else 1
            needles.append((j, ids[j + 1], ids[j + 3 : j + 3 + width]))
            structural |= set(range(j, j + 3 + width))

    if task in ("niah_single", "niah_multikey"):
        assert len(needles) == (1 if task == "niah_single" else cfg.num_pairs)
        values = {name: rhs for _, name, rhs in needles}
        assert len(values) == len(needles), "needle keys distinct"
        key = ids[q + 1]
        assert ids[q + 2] == sep and len(ids) - q - 3 == vl
        label(q + 3, values[key])
    elif task == "niah_multivalue":
        assert len(needles) == cfg.num_values
        key = ids[q + 1]
        assert all(name == key for _, name, _ in needles)
        assert len({tuple(rhs) for _, _, rhs in needles}) == cfg.num_values, "values distinct"
        assert ids[q + 2] == sep
        label(q + 3, [t for _, _, rhs in needles for t in rhs])
    elif task == "variable_tracking":
        assert len(needles) == 2 * cfg.chain_len
        value = ids[q + 1 : q + 1 + vl]
        assert ids[q + 1 + vl] == sep
        chain, current, last_position = [], value, 0
        while True:
            found = [(pos, name) for pos, name, rhs in needles if rhs == current]
            if not found:
                break
            assert len(found) == 1
            pos, name = found[0]
            assert pos > last_position, "a chain is assigned in order"
            chain.append(name)
            current, last_position = [name], pos
        assert len(chain) == cfg.chain_len
        label(q + 2 + vl, chain)
    else:
        raise AssertionError(task)
    return labels, structural
