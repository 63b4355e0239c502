"""Peak host memory of the gate-search process against the same model's frozen forward+backward (CPU).

Each measurement runs in a fresh subprocess and reports its ru_maxrss, so imports and allocator state of
one never leak into another:
    python -m bench.cpu_memory --model runs/embedded/teacher --batch 64 --seq-len 34 --steps 20
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _frozen_forward_backward(model_dir: str, batch: int, seq_len: int, steps: int) -> dict:
    """The plain HF model, every weight frozen; backward reaches the input embeddings through all layers."""
    import torch

    from flashmorph.model.load import load_causal_lm

    lm = load_causal_lm(model_dir, "float32").train()
    lm.requires_grad_(False)
    vocab = lm.config.vocab_size
    started = time.perf_counter()
    for step in range(steps):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(step))
        embeds = lm.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = lm(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
    return {"seconds_per_step": (time.perf_counter() - started) / steps}


def _child(args) -> None:
    result = _frozen_forward_backward(args.model, args.batch, args.seq_len, args.steps)
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _run_gate_search(args) -> dict:
    """The real launcher in one process (ZeRO-3 engine, morph attention, checkpoints off)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, str(ROOT / "launcher" / "gate_search.py"), "--config", args.recipe, "--no-progress",
               "--override", f"model.path={args.model}", "--override", f"run.run_dir={run_dir}/run",
               "--override", f"search.steps={args.steps}", "--override", f"search.micro_batch_size={args.batch}",
               "--override", f"data.seq_len={args.seq_len}", "--override", "search.save_every=0"]
        for item in args.override:
            cmd += ["--override", item]
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"gate search failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if peak <= before:
            raise SystemExit("cannot attribute the peak RSS: run this benchmark as its own process")
        return {"max_rss_mib": peak / 1024, "wall_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local HF model directory")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "embedded.yaml"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=34)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--override", action="append", default=[], help="extra recipe override for the gate search")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"error: --model {args.model} is not a HF model directory (no config.json)")
    # the gate search runs first so that RUSAGE_CHILDREN's maximum is its own
    search = _run_gate_search(args)
    child = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch),
                            "--seq-len", str(args.seq_len), "--steps", str(args.steps)],
                           capture_output=True, text=True, check=True)
    frozen = json.loads(child.stdout.strip().splitlines()[-1])
    report = {"model": args.model, "overrides": args.override, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
              "gate_search_max_rss_mib": round(search["max_rss_mib"], 1),
              "frozen_fwd_bwd_max_rss_mib": round(frozen["max_rss_mib"], 1),
              "ratio": round(search["max_rss_mib"] / frozen["max_rss_mib"], 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
