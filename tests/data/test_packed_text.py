"""Packed natural text: local files -> cached token stream (documents + EOS) -> seq_len windows by (seed, index)."""

import json

import numpy as np
import pytest
import torch

from flashmorph.data import Haystack, TokenSpace
from flashmorph.data.byte_tokenizer import ByteTokenizer
from flashmorph.data.packed_text import TOY_CORPUS_NAME, PackedTextDataset
from flashmorph.data.text_config import TextDataConfig
from flashmorph.data.text_corpus import TokenStream, tokenize_corpus
from flashmorph.data.toy_corpus import write_toy_corpus
from flashmorph.errors import ConfigError


@pytest.fixture
def jsonl_corpus(tmp_path, corpus_lines):
    """60 documents in field "body", with an empty document in the middle (it must vanish, not add a bare EOS)."""
    docs = corpus_lines[:30] + [""] + corpus_lines[30:]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    return path, corpus_lines


def _cfg(path, tmp_path, **kw):
    return TextDataConfig(**{"files": [str(path)], "text_field": "body", "cache_dir": str(tmp_path / "cache"),
                             "weight": 0.5, **kw})


def _expected_stream(tokenizer, docs):
    eos = tokenizer.eos_token_id
    return [t for doc in docs for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]]


def test_stream_is_every_document_then_eos(word_tokenizer, jsonl_corpus, tmp_path):
    path, docs = jsonl_corpus
    stream = tokenize_corpus(_cfg(path, tmp_path), word_tokenizer)
    assert stream.tokens.dtype == np.int32 and stream.num_documents == len(docs) == 60
    assert stream.eos_id == word_tokenizer.eos_token_id
    assert stream.tokens.tolist() == _expected_stream(word_tokenizer, docs)


def test_packing_is_exact_and_labels_are_the_ids(word_tokenizer, jsonl_corpus, tmp_path):
    path, _ = jsonl_corpus
    stream = tokenize_corpus(_cfg(path, tmp_path), word_tokenizer)
    seq_len = 37
    ordered = PackedTextDataset(stream, seq_len, shuffle=False)
    num_windows = stream.tokens.size // seq_len
    assert ordered.num_windows == num_windows > 10
    samples = [ordered[i] for i in range(num_windows)]
    for sample in samples:
        assert sample["input_ids"].dtype == torch.long and sample["input_ids"].shape == (seq_len,)
        assert torch.equal(sample["labels"], sample["input_ids"])
    joined = torch.cat([s["input_ids"] for s in samples]).tolist()
    assert joined == stream.tokens[: num_windows * seq_len].tolist(), "samples concatenate back to the stream"
    assert torch.equal(ordered[num_windows]["input_ids"], samples[0]["input_ids"]), "the next epoch starts over"

    shuffled = PackedTextDataset(stream, seq_len, seed=3)
    epoch0 = [shuffled.window_of(i) for i in range(num_windows)]
    epoch1 = [shuffled.window_of(num_windows + i) for i in range(num_windows)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(num_windows)), "each epoch visits every window once"
    assert epoch0 != list(range(num_windows)) and epoch0 != epoch1
    by_window = sorted(range(num_windows), key=epoch0.__getitem__)
    joined = torch.cat([shuffled[i]["input_ids"] for i in by_window]).tolist()
    assert joined == stream.tokens[: num_windows * seq_len].tolist()


def test_deterministic_across_instances_and_tokenized_once(word_tokenizer, jsonl_corpus, tmp_path):
    path, _ = jsonl_corpus
    cfg = _cfg(path, tmp_path, seed=11)
    first = PackedTextDataset.from_config(cfg, word_tokenizer, seq_len=16)
    cache_files = sorted(p.name for p in (tmp_path / "cache").rglob("cache-*.arrow"))
    assert cache_files, "datasets cached the tokenized corpus"
    second = PackedTextDataset.from_config(cfg, word_tokenizer, seq_len=16)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("cache-*.arrow")) == cache_files, (
        "the second build reads the cache instead of tokenizing again"
    )
    indices = [0, 1, 5, 17, first.num_windows + 2, 10**6]
    batch_a, batch_b = first.batch(indices), second.batch(indices)
    assert set(batch_a) == {"input_ids", "labels"} and batch_a["input_ids"].shape == (len(indices), 16)
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
    other_seed = PackedTextDataset.from_config(_cfg(path, tmp_path, seed=12), word_tokenizer, seq_len=16)
    assert not torch.equal(other_seed.batch(indices)["input_ids"], batch_a["input_ids"])


def test_with_seq_len_shares_the_stream(word_tokenizer, jsonl_corpus, tmp_path):
    path, _ = jsonl_corpus
    short = PackedTextDataset.from_config(_cfg(path, tmp_path), word_tokenizer, seq_len=8)
    long = short.with_seq_len(32)
    assert long.seq_len == 32 and long.num_windows == short.stream.tokens.size // 32
    assert np.shares_memory(long.windows, short.windows)


def test_text_files_are_one_document_each_and_max_documents(word_tokenizer, corpus_lines, tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"book{i}.txt")
        files[-1].write_text("\n".join(corpus_lines[i * 10 : (i + 1) * 10]) + "\n")
    cfg = TextDataConfig(files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"))
    stream = tokenize_corpus(cfg, word_tokenizer)
    docs = [f.read_text() for f in files]
    assert stream.num_documents == 3
    assert stream.tokens.tolist() == _expected_stream(word_tokenizer, docs)
    limited = tokenize_corpus(TextDataConfig(**{**cfg.__dict__, "max_documents": 2}), word_tokenizer)
    assert limited.num_documents == 2 and limited.tokens.tolist() == _expected_stream(word_tokenizer, docs[:2])


def test_explicit_format_and_parquet(word_tokenizer, corpus_lines, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    odd = tmp_path / "docs.data"  # a suffix "auto" cannot place
    odd.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus_lines[:5]))
    with pytest.raises(ConfigError, match=r"text\.files entry .* unknown suffix; set text\.format"):
        TextDataConfig(files=[str(odd)], weight=0.5).validate()
    stream = tokenize_corpus(TextDataConfig(files=[str(odd)], format="jsonl", cache_dir=str(tmp_path / "c")),
                             word_tokenizer)
    assert stream.tokens.tolist() == _expected_stream(word_tokenizer, corpus_lines[:5])
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": corpus_lines[:7]}), table)
    stream = tokenize_corpus(TextDataConfig(files=[str(table)], cache_dir=str(tmp_path / "c")), word_tokenizer)
    assert stream.tokens.tolist() == _expected_stream(word_tokenizer, corpus_lines[:7])


def test_model_dir_tokenizer_or_byte_fallback(word_tokenizer, jsonl_corpus, tmp_path):
    path, docs = jsonl_corpus
    cfg = _cfg(path, tmp_path)
    with_tokenizer = tmp_path / "model_with_tokenizer"
    word_tokenizer.save_pretrained(with_tokenizer)
    packed = PackedTextDataset.from_model(cfg, with_tokenizer, vocab_size=len(word_tokenizer), seq_len=16)
    assert packed.stream.tokens.tolist() == _expected_stream(word_tokenizer, docs)

    bare = tmp_path / "tiny_teacher"  # config and weights only, like the embedded teacher
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    packed = PackedTextDataset.from_model(cfg, bare, vocab_size=64, seq_len=16)
    space = TokenSpace.synthetic(64)
    tokens = packed.stream.tokens
    assert set(tokens.tolist()) <= set(space.filler_ids.tolist()) | {space.bos_id}, "filler ids, BOS between docs"
    assert int((tokens == space.bos_id).sum()) == len(docs)
    first_doc = docs[0].encode("utf-8")
    expected = space.filler_ids[torch.tensor(list(first_doc)) % space.filler_ids.numel()].tolist()
    assert tokens[: len(first_doc)].tolist() == expected, "byte b -> filler_ids[b % num_filler]"
    assert tokens[len(first_doc)] == space.bos_id


def test_byte_tokenizer_serves_the_text_haystack_too(corpus_lines, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines))
    space = TokenSpace.synthetic(64)
    tokenizer = ByteTokenizer(space)
    exclude = {space.bos_id, space.pad_id, *space.marker_ids}  # what Haystack.from_config passes
    haystack = Haystack.from_text_files([str(corpus)], tokenizer, exclude_ids=exclude, cache_dir=str(tmp_path / "c"))
    assert len(haystack) == len(corpus.read_bytes())
    assert set(haystack.tokens.tolist()) <= set(space.filler_ids.tolist())


def test_toy_corpus_for_the_embedded_pipeline(tmp_path):
    first = write_toy_corpus(tmp_path / "a" / TOY_CORPUS_NAME)
    mtime = first.stat().st_mtime_ns
    assert write_toy_corpus(first).stat().st_mtime_ns == mtime, "an identical corpus is not rewritten"
    again = write_toy_corpus(tmp_path / "b.jsonl")
    assert first.read_bytes() == again.read_bytes()
    docs = [json.loads(line)["text"] for line in first.read_text().splitlines()]
    assert len(docs) >= 20 and sum(map(len, docs)) > 50_000
    cfg = TextDataConfig(toy_corpus=True, weight=0.25, cache_dir=str(tmp_path / "cache"))
    cfg.validate()
    packed = PackedTextDataset.from_config(cfg, ByteTokenizer.synthetic(64), seq_len=34, work_dir=tmp_path / "run")
    assert (tmp_path / "run" / TOY_CORPUS_NAME).is_file()
    assert packed.num_windows > 1000 and packed.stream.num_documents == len(docs)


def test_errors_are_one_line_and_name_the_fix(word_tokenizer, jsonl_corpus, tmp_path):
    path, _ = jsonl_corpus

    def error(fn) -> str:
        with pytest.raises(ConfigError) as info:
            fn()
        message = str(info.value)
        assert "\n" not in message
        return message

    gone = [str(tmp_path / "gone.jsonl")]
    assert "does not exist" in error(lambda: TextDataConfig(files=gone, weight=0.5).validate())
    assert "does not exist" in error(
        lambda: tokenize_corpus(TextDataConfig(files=[str(tmp_path / "gone.jsonl")]), word_tokenizer)
    )
    message = error(lambda: tokenize_corpus(_cfg(path, tmp_path, text_field="text"), word_tokenizer))
    assert "text.text_field='text' is not a column" in message and "body" in message
    assert "not strings" in error(lambda: tokenize_corpus(_cfg(path, tmp_path, text_field="id"), word_tokenizer))
    small = TokenStream(tokens=np.arange(20, dtype=np.int32), num_documents=2, eos_id=1)
    message = error(lambda: PackedTextDataset(small, seq_len=21))
    assert "has 20 tokens (2 documents" in message and "seq_len=21" in message
    assert len(PackedTextDataset(small, seq_len=20).windows) == 1
    assert "text.files is empty" in error(lambda: TextDataConfig(weight=0.5).validate())
    TextDataConfig().validate()  # weight 0: text is off, no files needed
    assert "text.weight" in error(lambda: TextDataConfig(weight=1.5).validate())
    assert "text.format" in error(lambda: TextDataConfig(format="csv").validate())
    assert "text.max_documents" in error(lambda: TextDataConfig(max_documents=0).validate())
    assert "clear one" in error(lambda: TextDataConfig(files=[str(path)], toy_corpus=True).validate())
    other = tmp_path / "more.txt"
    other.write_text("x")
    assert "mixes formats" in error(lambda: TextDataConfig(files=[str(path), str(other)], weight=0.5).validate())
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    assert "could not be read as json" in error(
        lambda: tokenize_corpus(TextDataConfig(files=[str(broken)], cache_dir=str(tmp_path / "c")), word_tokenizer)
    )
