"""One generator per retrieval task: (rng, space, cfg, haystack) -> (input_ids, labels), both LongTensor[seq_len].

Every sample is BOS, then the content blocks spread over the haystack at random depths, then the question section
last, so the answer tokens end the sample. labels[i] = input_ids[i] on answer tokens, IGNORE_INDEX elsewhere (HF
causal-LM convention: the model shifts labels itself). Per sample the work is a few dozen vectorized numpy calls,
independent of seq_len apart from drawing the filler."""

from collections.abc import Callable

import numpy as np
import torch

from flashmorph.data.config import DataConfig
from flashmorph.data.haystack import Haystack
from flashmorph.data.token_space import TokenSpace
from flashmorph.errors import ConfigError

IGNORE_INDEX = -100  # label of every non-answer token (torch cross_entropy's default ignore_index)

TaskFn = Callable[[np.random.Generator, TokenSpace, DataConfig, Haystack], tuple[torch.Tensor, torch.Tensor]]


def mqar(rng: np.random.Generator, space: TokenSpace, cfg: DataConfig, haystack: Haystack):
    """BOS, P x (k SEP v) spread over filler, QUERY, Q x (q SEP a): keys distinct, values may repeat, the queries are a
    random subset (in random order) of the keys, the answers their values. With cfg.kv_separator off, pairs and
    queries are plain `k v` / `q a` (Zoology's MQAR: one induction hop, what a tiny model learns fastest)."""
    num_pairs, vl = cfg.num_pairs, cfg.value_len
    width = (2 if cfg.kv_separator else 1) + vl
    pairs = np.empty((num_pairs, width), dtype=np.int64)  # [pair, (key, [SEP], value...)]
    pairs[:, 0] = rng.choice(space.key_np, num_pairs, replace=False)
    if cfg.kv_separator:
        pairs[:, 1] = space.kv_sep_id
    pairs[:, width - vl :] = space.value_np[rng.integers(0, space.value_np.size, size=(num_pairs, vl))]
    asked = rng.permutation(num_pairs)[: cfg.queries_per_sample]
    query = np.concatenate([[space.query_id], pairs[asked].ravel()])  # a query row repeats its pair row
    answer = _answer_mask(len(asked), prefix=width - vl, answer=vl, lead=1)
    return _assemble(rng, space, cfg, haystack, pairs.ravel(), np.full(num_pairs, width), query, answer)


def niah_single(rng: np.random.Generator, space: TokenSpace, cfg: DataConfig, haystack: Haystack):
    """BOS, filler with one needle (NEEDLE k SEP v) at a random depth, QUERY k SEP v."""
    return _needles_with_keys(rng, space, cfg, haystack, num_needles=1)


def niah_multikey(rng: np.random.Generator, space: TokenSpace, cfg: DataConfig, haystack: Haystack):
    """BOS, filler with num_pairs needles (NEEDLE k_j SEP v_j, keys distinct), QUERY k_i SEP v_i for one random i."""
    return _needles_with_keys(rng, space, cfg, haystack, num_needles=cfg.num_pairs)


def niah_multivalue(rng: np.random.Generator, space: TokenSpace, cfg: DataConfig, haystack: Haystack):
    """BOS, filler with num_values needles (NEEDLE k SEP v_j) of one key and distinct values, QUERY k SEP v_1 ... v_N
    with the values in their order of appearance."""
    num_values, vl = cfg.num_values, cfg.value_len
    key = rng.choice(space.key_np)
    values = _distinct_values(rng, space, num_values, vl)  # [needle, value_len]
    needles = _needle_rows(space.needle_id, np.full(num_values, key), space.kv_sep_id, values)
    query = np.concatenate([[space.query_id, key, space.kv_sep_id], values.ravel()])
    answer = np.concatenate([np.zeros(3, dtype=bool), np.ones(num_values * vl, dtype=bool)])
    return _assemble(rng, space, cfg, haystack, needles.ravel(), np.full(num_values, 3 + vl), query, answer)


def variable_tracking(rng: np.random.Generator, space: TokenSpace, cfg: DataConfig, haystack: Haystack):
    """Two chains NEEDLE x1 ASSIGN v, NEEDLE x2 ASSIGN x1, ..., NEEDLE xC ASSIGN x(C-1) (the second one a distractor
    with its own variables and value), interleaved in filler with each chain in order; then QUERY v SEP x1 ... xC."""
    chain_len, vl = cfg.chain_len, cfg.value_len
    names = rng.choice(space.key_np, 2 * chain_len, replace=False).reshape(2, chain_len)  # [chain, hop]
    values = _distinct_values(rng, space, 2, vl)  # [chain, value_len]
    chains = []
    for c in range(2):
        first = np.concatenate([[space.needle_id, names[c, 0], space.assign_id], values[c]])
        hops = np.stack(
            [
                np.full(chain_len - 1, space.needle_id),
                names[c, 1:],
                np.full(chain_len - 1, space.assign_id),
                names[c, :-1],
            ],
            axis=1,
        )  # [hop, 4]
        chains.append([first, *hops])
    # which of the 2C block slots the asked chain takes; each chain keeps its order (x_j is assigned after x_(j-1))
    slots_asked = np.zeros(2 * chain_len, dtype=bool)
    slots_asked[rng.choice(2 * chain_len, chain_len, replace=False)] = True
    order = [chains[0].pop(0) if asked else chains[1].pop(0) for asked in slots_asked]
    query = np.concatenate([[space.query_id], values[0], [space.kv_sep_id], names[0]])
    answer = np.concatenate([np.zeros(2 + vl, dtype=bool), np.ones(chain_len, dtype=bool)])
    lengths = np.array([len(block) for block in order])
    return _assemble(rng, space, cfg, haystack, np.concatenate(order), lengths, query, answer)


TASKS: dict[str, TaskFn] = {
    "mqar": mqar,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
}


def _needles_with_keys(rng, space: TokenSpace, cfg: DataConfig, haystack: Haystack, num_needles: int):
    vl = cfg.value_len
    keys = rng.choice(space.key_np, num_needles, replace=False)
    values = space.value_np[rng.integers(0, space.value_np.size, size=(num_needles, vl))]
    needles = _needle_rows(space.needle_id, keys, space.kv_sep_id, values)  # [needle, 3 + value_len]
    asked = int(rng.integers(0, num_needles))
    query = np.concatenate([[space.query_id], needles[asked, 1:]])  # QUERY k SEP v
    answer = _answer_mask(1, prefix=2, answer=vl, lead=1)
    return _assemble(rng, space, cfg, haystack, needles.ravel(), np.full(num_needles, 3 + vl), query, answer)


def _needle_rows(needle_id: int, keys: np.ndarray, sep_id: int, values: np.ndarray) -> np.ndarray:
    rows = np.empty((len(keys), 3 + values.shape[1]), dtype=np.int64)  # [needle, (NEEDLE, key, SEP, value...)]
    rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:] = needle_id, keys, sep_id, values
    return rows


def _distinct_values(rng, space: TokenSpace, n: int, value_len: int) -> np.ndarray:
    """[n, value_len] values that differ pairwise: distinct first tokens make distinct values of any length."""
    values = space.value_np[rng.integers(0, space.value_np.size, size=(n, value_len))]
    values[:, 0] = rng.choice(space.value_np, n, replace=False)
    return values


def _answer_mask(rows: int, prefix: int, answer: int, lead: int) -> np.ndarray:
    """`lead` non-answer tokens, then `rows` x (`prefix` non-answer tokens, `answer` answer tokens)."""
    mask = np.zeros((rows, prefix + answer), dtype=bool)
    mask[:, prefix:] = True
    return np.concatenate([np.zeros(lead, dtype=bool), mask.ravel()])


def _spread(rng, blocks: np.ndarray, lengths: np.ndarray, filler: np.ndarray) -> np.ndarray:
    """Interleave the blocks (concatenated in `blocks`, in order) with the filler: each block starts after a uniformly
    random number of filler tokens, so content lands at random depths. Returns [len(blocks) + len(filler)] ids."""
    total = blocks.size + filler.size
    filler_before = np.sort(rng.integers(0, filler.size + 1, size=lengths.size))  # filler tokens ahead of block j
    # block token t of block j sits after filler_before[j] filler tokens and the t block tokens ahead of it
    positions = np.repeat(filler_before, lengths) + np.arange(blocks.size)
    context = np.empty(total, dtype=np.int64)
    is_filler = np.ones(total, dtype=bool)
    is_filler[positions] = False
    context[positions] = blocks
    context[is_filler] = filler
    return context


def _assemble(rng, space: TokenSpace, cfg: DataConfig, haystack: Haystack, blocks, lengths, query, answer):
    """BOS + blocks spread over filler + query section, exactly cfg.seq_len tokens; labels on the answer tokens."""
    num_filler = cfg.seq_len - 1 - blocks.size - query.size
    if num_filler < 0:  # validate() catches this; the guard covers callers that skip it
        raise ConfigError(f"data.seq_len={cfg.seq_len} is too short by {-num_filler} tokens; raise data.seq_len")
    context = _spread(rng, blocks, lengths, haystack.sample(rng, num_filler))
    input_ids = np.empty(cfg.seq_len, dtype=np.int64)
    input_ids[0] = space.bos_id
    input_ids[1 : 1 + context.size] = context
    input_ids[1 + context.size :] = query
    labels = np.full(cfg.seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[1 + context.size :] = np.where(answer, query, IGNORE_INDEX)
    return torch.from_numpy(input_ids), torch.from_numpy(labels)
