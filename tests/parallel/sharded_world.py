"""Rank body of the sharded-load test (test_sharded_load.py) and of its bigger measurement: build on meta, read this
rank's TP slices, and report what the load and one forward add to the process's memory, and the logits of a batch.

Bigger measurements (docs/parallelism.md): python tests/parallel/sharded_world.py --hidden 1024 --vocab 4096
and the 70B-shaped training step: python tests/parallel/sharded_world.py --llama70b-scaled --layers 2
"""

import argparse
import ctypes
import gc
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BATCH_SEED, ROWS, SEQ = 7, 2, 16
TP_DEGREES = (4, 2, 1)
HYBRID = ["full", "linear", "linear", "full"]  # the layout applied after the load  # measured in this order in one 4-rank world (TP=1 and TP=2 run with DP=4 and DP=2)


def model_config(hidden: int = 512, vocab: int = 2048, layers: int = 4):
    """A Llama with 8 query and 4 kv heads (so TP=4 holds one kv head per rank) and MLP width 4 x hidden."""
    from flashmorph.model.tiny import tiny_config

    return tiny_config("llama", num_layers=layers, hidden_size=hidden, num_heads=8, num_kv_heads=4, vocab_size=vocab,
                       intermediate_size=4 * hidden)


def scaled_70b_config(layers: int = 2):
    """Llama-3-70B's structure at CPU size: its 64 query and 8 kv heads (GQA 8, so TP=8 still holds whole kv heads),
    MLP/hidden ratio 3.5 and vocab/hidden ratio 15.66 kept; head_dim 128 -> 16 (so hidden 8192 -> 1024),
    intermediate 28672 -> 3584, vocab 128256 -> 16032, 80 layers -> `layers`."""
    from flashmorph.model.tiny import tiny_config

    return tiny_config("llama", num_layers=layers, hidden_size=1024, num_heads=64, num_kv_heads=8, vocab_size=16032,
                       intermediate_size=3584)


def mini_70b_config():
    """Llama-3-70B's head structure at CI size: 64 query and 8 kv heads, MLP/hidden 3.5 and vocab/hidden 15.66
    kept; head_dim 128 -> 4 (hidden 256), intermediate 896, vocab 4008, 80 layers -> 2."""
    from flashmorph.model.tiny import tiny_config

    return tiny_config("llama", num_layers=2, hidden_size=256, num_heads=64, num_kv_heads=8, vocab_size=4008,
                       intermediate_size=896)


def batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(BATCH_SEED))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """The highest resident set size seen while open, polled every millisecond. ru_maxrss cannot serve: the imports
    (deepspeed, megatron) peak higher than a small model's load, and it never comes down for a second load."""

    def __init__(self):
        self.peak = self.start = 0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self.start = self.peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def _train_step(lm, ids: torch.Tensor) -> tuple[float, float]:
    """Forward, backward and one AdamW step on every parameter; the loss before and after the step."""
    lm.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    loss = lm(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = lm(input_ids=ids, labels=ids, use_cache=False).loss
    return loss.item(), after.item()


def _load_and_run(model_dir: str, tp: int, world_size: int, ids: torch.Tensor, train: bool = False) -> dict:
    from flashmorph.parallel.layout import resolve_layout
    from flashmorph.parallel.mesh import destroy_mesh, init_mesh
    from flashmorph.parallel.sharded_load import load_sharded_causal_lm

    mesh = init_mesh(resolve_layout(tp, 1, world_size))
    try:
        with PeakRSS() as rss:
            lm = load_sharded_causal_lm(model_dir, mesh, dtype="float32")
            with torch.no_grad():
                logits = lm(input_ids=ids, use_cache=False).logits  # touches every weight
            loss = _train_step(lm, ids) if train else None
        hybrid_logits = None
        if not train:  # the stages morph after loading: a hybrid on the sharded model must match one on the full
            from flashmorph.model.hybrid import apply_hybrid_layout

            with torch.no_grad():
                hybrid_logits = apply_hybrid_layout(lm, HYBRID)(input_ids=ids, use_cache=False).logits
        params = list(lm.parameters())
        attn = lm.model.layers[0].self_attn
        out = {"peak_bytes": rss.increase, "param_bytes": sum(p.numel() * p.element_size() for p in params),
               "projection_params": sum(p.numel() for n, p in lm.model.layers.named_parameters() if "_proj." in n),
               "logits": logits, "hybrid_logits": hybrid_logits, "loss": loss, "q_rows": attn.q_proj.weight.shape[0],
               "on_meta": [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta],
               "tp_tagged": getattr(attn.o_proj.weight, "tensor_model_parallel", None),
               "tied": lm.lm_head.weight is lm.model.embed_tokens.weight,
               "inv_freq": lm.model.rotary_emb.inv_freq.clone()}
        del lm, params, attn
        return out
    finally:
        destroy_mesh()
        gc.collect()
        # hand freed heap back to the OS, or the next degree's load reuses it unseen and measures low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def sharded_ranks(info, model_dir: str, vocab_size: int, train: bool = False, mini_70b_dir: str | None = None) -> dict:
    """Every TP degree of TP_DEGREES on this world, one after the other; {tp: this rank's result}. With
    `mini_70b_dir` (mini_70b_config's weights), also {"mini_70b": {tp: result}}: load + training step at TP=4 and 1."""
    ids = batch(vocab_size)
    # one unmeasured round first: lazy imports, megatron's and gloo's first-call buffers are not the load's memory
    _load_and_run(model_dir, TP_DEGREES[0], info.world_size, ids, train)
    out = {tp: _load_and_run(model_dir, tp, info.world_size, ids, train) for tp in TP_DEGREES}
    if mini_70b_dir is not None:
        mini_ids = batch(mini_70b_config().vocab_size)
        out["mini_70b"] = {tp: _load_and_run(mini_70b_dir, tp, info.world_size, mini_ids, train=True) for tp in (4, 1)}
    return out


def write_model(model_dir: Path, config) -> int:
    """Random weights of `config` saved as a HF directory; returns their bytes."""
    from flashmorph.model.tiny import build_tiny_model

    lm = build_tiny_model(config)
    lm.save_pretrained(model_dir)
    return sum(p.numel() * p.element_size() for p in lm.parameters())


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.multiproc
    from helpers.multiproc import run_distributed

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--llama70b-scaled", action="store_true",
                        help="scaled_70b_config (its --layers) instead of --hidden/--vocab, and a training step")
    args = parser.parse_args(argv)
    config = scaled_70b_config(args.layers) if args.llama70b_scaled else model_config(args.hidden, args.vocab,
                                                                                      args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        total = write_model(Path(tmp), config)
        ranks = run_distributed(sharded_ranks, 4, tmp, config.vocab_size, args.llama70b_scaled, timeout=1800)
    print(f"model: {total / 2**20:.1f} MiB fp32 (hidden {config.hidden_size}, {config.num_attention_heads} heads, "
          f"{config.num_key_value_heads} kv heads, MLP {config.intermediate_size}, vocab {config.vocab_size}, "
          f"{config.num_hidden_layers} layers)")
    what = "load + forward + backward + AdamW step" if args.llama70b_scaled else "load + one forward"
    for tp in sorted(TP_DEGREES):
        peaks = [out[tp]["peak_bytes"] / 2**20 for out in ranks]
        loss = ranks[0][tp]["loss"]
        print(f"TP={tp}: parameters per rank {ranks[0][tp]['param_bytes'] / 2**20:.1f} MiB, peak RSS increase per "
              f"rank ({what}) {min(peaks):.1f}-{max(peaks):.1f} MiB" + (f", loss {loss[0]:.6f}" if loss else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
