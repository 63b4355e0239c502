"""Per-GPU memory and tokens per step of a flashmorph run, before launching it (flashmorph.estimate does the math).

    python tools/estimate.py --preset llama3-70b --gpus 64 --tp 8 --sp 8 --seq-len 131072 --trainable linear
    python tools/estimate.py --recipe recipes/llama3_8b_distill.yaml --gpus 8 --preset llama3-8b
    python tools/estimate.py --recipe recipes/llama3_70b_long_context.yaml --gpus 64   # preset from model.path's name
    python tools/estimate.py --preset llama3-8b --max-seq-len --gpu-memory-gib 80
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from flashmorph.cli._tool import ArgumentParser, run_tool
from flashmorph.errors import ConfigError
from flashmorph.estimate import (
    GIB,
    PRESETS,
    TRAINABLE_SETS,
    EstimateSetup,
    ModelShape,
    estimate,
    load_shape,
    max_seq_len,
    preset_named_by,
)

STAGE_SECTIONS = ("search", "distill")  # a recipe's stage section: gate search or distillation/long-context

ROWS = (
    ("weights", "weights (student)"),
    ("teacher_weights", "weights (teacher)"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("zero_buffers", "ZeRO buffers"),
    ("activations", "activations (kept)"),
    ("layer_backward", "layer recompute + backward *"),
    ("logits_loss", "logits / loss *"),
    ("overhead", "overhead (guess)"),
)


def _full_layers(text: str) -> int | str:
    if text == "mixed":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--full-layers {text!r} must be an integer or 'mixed'") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description="Estimate per-GPU memory (weights, gradients, optimizer, activations, "
                                        "logits) and tokens per optimizer step of a flashmorph run.")
    model = parser.add_argument_group("model (one of them; --preset/--model-dir override a recipe's model.path, "
                                      "which names a preset when it holds no config.json)")
    model.add_argument("--preset", choices=sorted(PRESETS), help="a published model shape")
    model.add_argument("--model-dir", help="a HF model directory (only its config.json is read)")
    model.add_argument("--recipe", help="a recipe YAML: model, data.seq_len, parallel and the search/distill section "
                                        "fill every flag left out")
    run = parser.add_argument_group("run (flags win over the recipe)")
    run.add_argument("--gpus", type=int, default=1, help="total GPUs (default 1)")
    run.add_argument("--tp", type=int, help="tensor-parallel degree (default 1)")
    run.add_argument("--sp", type=int, help="sequence-parallel (Ulysses) degree (default 1)")
    run.add_argument("--seq-len", type=int, help="tokens per sequence")
    run.add_argument("--micro-batch", type=int, help="sequences per data-parallel rank per micro step (default 1)")
    run.add_argument("--grad-accum", type=int, help="micro steps per optimizer step (default 1)")
    run.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default bfloat16")
    run.add_argument("--trainable", choices=TRAINABLE_SETS,
                     help="gates: gate search; lora; linear: q/k/v/o of the linear layers; full (default gates)")
    run.add_argument("--lora-rank", type=int, help="LoRA rank (default 16)")
    run.add_argument("--lora-modules", help="comma-separated projections with adapters (default q_proj,k_proj,"
                                            "v_proj,o_proj)")
    run.add_argument("--lora-all-layers", action="store_true", default=None,
                     help="adapters in every layer, not only the linear ones")
    run.add_argument("--full-layers", type=_full_layers,
                     help="full-attention layers of the hybrid, or 'mixed' (every layer runs both branches: gate "
                          "search). Default: mixed for gates, a quarter of the layers otherwise")
    run.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", default=None,
                     help="keep every layer's activations (default: checkpointing on, or the recipe's setting)")
    run.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=None,
                     help="recompute each layer in backward")
    run.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (default 3)")
    run.add_argument("--loss-chunk", type=int, help="tokens per tiled-loss chunk, 0 = untiled (default 4096)")
    run.add_argument("--vocab-chunk", type=int, help="vocab columns per fp32 loss tile (default: whole vocab)")
    run.add_argument("--loss-tokens", type=int,
                     help="tokens with logits per micro step (default: all; gate search: its answer tokens)")
    out = parser.add_argument_group("output")
    out.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    out.add_argument("--max-seq-len", action="store_true",
                     help="find the longest sequence that fits --gpu-memory-gib (bisection) instead")
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- recipes


def _get(tree: dict, dotted: str, default=None, required: str | None = None, where: str = "recipe"):
    """tree["a"]["b"] for "a.b"; a one-line error naming the field and `required` (the fix) when it is absent."""
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            if required is not None:
                raise ConfigError(f"{where} lacks {dotted}; {required}")
            return default
        node = node[key]
    return node


def _count_full_layers(layout_path: str) -> int | None:
    """Full-attention layers of a hybrid.json ("layer_types" or "layers"), or None where it cannot be read."""
    try:
        data = json.loads(Path(layout_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    modes = data.get("layer_types", data.get("layers")) if isinstance(data, dict) else None
    return sum(mode == "full" for mode in modes) if isinstance(modes, list) else None


def recipe_settings(path: str, gpus: int, args: argparse.Namespace) -> tuple[dict, str | None]:
    """EstimateSetup fields read loosely from a recipe YAML (flags in `args` win), and its model.path.

    The stage section is `search` (gate search: trainable gates, every layer mixed) or `distill` (distillation and
    long-context: distill.trainable, lora_rank, lora_targets, token_chunk, vocab_chunk, length_schedule).
    """
    import yaml

    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"--recipe {path} is not readable ({err.strerror}); give a recipe YAML") from None
    except yaml.YAMLError:
        raise ConfigError(f"--recipe {path} is not valid YAML; fix it") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--recipe {path} is not a mapping of sections")
    where = f"recipe {path}"
    stage = next((name for name in STAGE_SECTIONS if isinstance(tree.get(name), dict)), None)
    if stage is None:
        raise ConfigError(f"{where} has no search or distill section; the estimator reads the stage's batch from it")
    out = {
        "dtype": _get(tree, "model.dtype", "bfloat16"),
        "activation_checkpointing": bool(_get(tree, "model.activation_checkpointing", False)),
        "zero_stage": _get(tree, "parallel.zero_stage", 3),
        "grad_accum": _get(tree, f"{stage}.grad_accum_steps", 1),
    }
    if args.micro_batch is None:
        out["micro_batch"] = _get(tree, f"{stage}.micro_batch_size", required="add it or pass --micro-batch",
                                  where=where)
    layout = (_get(tree, "parallel.layouts", {}) or {}).get(gpus) or {}
    out["tensor_parallel"] = layout.get("tensor_parallel", _get(tree, "parallel.tensor_parallel", 1))
    out["sequence_parallel"] = layout.get("sequence_parallel", _get(tree, "parallel.sequence_parallel", 1))
    schedule = _get(tree, f"{stage}.length_schedule") or []
    if schedule:  # the curriculum's longest stage is the peak
        lengths = [entry.get("seq_len") for entry in schedule if isinstance(entry, dict)]
        if not lengths or not all(isinstance(n, int) for n in lengths):
            raise ConfigError(f"{where}: every {stage}.length_schedule entry needs an integer seq_len")
        out["seq_len"] = max(lengths)
    elif args.seq_len is None:
        out["seq_len"] = _get(tree, "data.seq_len", required="add it or pass --seq-len", where=where)
    if stage == "search":
        out.update(trainable="gates", full_layers="mixed")
    else:
        if args.trainable is None:
            out["trainable"] = _get(tree, "distill.trainable", required="add lora, linear or full, or pass "
                                                                        "--trainable", where=where)
        if out.get("trainable", args.trainable) == "lora" and args.lora_rank is None:
            out["lora_rank"] = _get(tree, "distill.lora_rank", required="add it or pass --lora-rank", where=where)
        targets = _get(tree, "distill.lora_targets")
        if targets:
            out["lora_modules"] = tuple(targets)
        only_linear = _get(tree, "distill.lora_linear_layers_only")
        if only_linear is not None:
            out["lora_linear_layers_only"] = bool(only_linear)
        for key, field in (("token_chunk", "loss_chunk"), ("vocab_chunk", "vocab_chunk")):
            value = _get(tree, f"distill.{key}")
            if value is not None:
                out[field] = value
        layout_path = _get(tree, "student.layout")
        full = _count_full_layers(layout_path) if layout_path else None
        if full is not None:
            out["full_layers"] = full
    return out, _get(tree, "model.path")


def build_setup(args: argparse.Namespace) -> tuple[ModelShape, EstimateSetup]:
    """The model shape and run settings from flags, filled in from --recipe where given."""
    fields, recipe_model = ({}, None)
    if args.recipe:
        fields, recipe_model = recipe_settings(args.recipe, args.gpus, args)
    flags = {
        "tensor_parallel": args.tp, "sequence_parallel": args.sp, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "dtype": args.dtype,
        "trainable": args.trainable, "lora_rank": args.lora_rank, "full_layers": args.full_layers,
        "activation_checkpointing": args.checkpointing, "zero_stage": args.zero_stage,
        "loss_chunk": args.loss_chunk, "vocab_chunk": args.vocab_chunk, "loss_tokens": args.loss_tokens,
    }
    if args.lora_modules:
        flags["lora_modules"] = tuple(m.strip() for m in args.lora_modules.split(",") if m.strip())
    if args.lora_all_layers:
        flags["lora_linear_layers_only"] = False
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.trainable is not None and args.trainable != "gates" and fields.get("full_layers") == "mixed" \
            and args.full_layers is None:
        del fields["full_layers"]  # a search recipe estimated as distillation: the hybrid's default applies
    if args.preset or args.model_dir:
        shape = load_shape(args.preset, args.model_dir)
    elif recipe_model and (Path(recipe_model) / "config.json").is_file():
        shape = load_shape(model_dir=recipe_model)
    elif recipe_model:
        # the shipped recipes name a model directory this machine usually lacks: its name says which preset it is
        preset = preset_named_by(Path(recipe_model).name)
        if preset is None:
            raise ConfigError(f"the recipe's model.path={recipe_model} holds no config.json; pass --preset NAME or "
                              "--model-dir DIR")
        print(f"note: the recipe's model.path={recipe_model} holds no config.json; estimating the preset {preset} "
              "its name spells (--model-dir DIR reads a real config.json)", file=sys.stderr)
        shape = load_shape(preset)
    else:
        raise ConfigError("no model: pass --preset NAME or --model-dir DIR (or a --recipe with model.path)")
    return shape, EstimateSetup(gpus=args.gpus, **fields)


# ----------------------------------------------------------------------------------------- output


def _describe(shape: ModelShape, setup: EstimateSetup, full_layers) -> list[str]:
    trainable = setup.trainable
    if trainable == "lora":
        where = "linear layers" if setup.lora_linear_layers_only and full_layers != "mixed" else "all layers"
        trainable = f"lora r={setup.lora_rank} on {','.join(setup.lora_modules)} ({where})"
    layers = "all mixed" if full_layers == "mixed" else f"{full_layers} full / {shape.num_layers - full_layers} linear"
    return [
        f"model: {shape.name} ({shape.num_layers} layers, hidden {shape.hidden_size}, heads {shape.num_heads}/"
        f"{shape.num_kv_heads} kv, vocab {shape.vocab_size})",
        f"layout: {setup.gpus} GPUs = TP {setup.tensor_parallel} x SP {setup.sequence_parallel} x DP "
        f"{setup.data_parallel}; ZeRO-{setup.zero_stage}; {setup.dtype}",
        f"step: seq_len {setup.seq_len}, micro batch {setup.micro_batch}, grad accum {setup.grad_accum}; "
        f"checkpointing {'on' if setup.activation_checkpointing else 'off'}",
        f"trainable: {trainable}; layers: {layers}",
    ]


def format_table(shape: ModelShape, setup: EstimateSetup, result, gpu_memory_gib: float) -> str:
    lines = _describe(shape, setup, result.full_layers)
    lines += ["", f"{'component':32s}{'GiB/GPU':>10s}"]
    lines += [f"{label:32s}{getattr(result, name) / GIB:10.2f}" for name, label in ROWS]
    lines += [
        f"{'total (peak)':32s}{result.total / GIB:10.2f}",
        f"{'  of which torch-allocated':32s}{result.allocated / GIB:10.2f}",
        "* only the larger of the two starred rows counts in the total (they never coexist)",
        f"fits on {gpu_memory_gib:g} GiB: {'yes' if result.fits(gpu_memory_gib) else 'no'}",
        f"tokens per optimizer step: {result.tokens_per_step:,} ({result.sequences_per_step} sequences of "
        f"{setup.seq_len:,})",
        f"trainable parameters per TP rank: {result.params_trainable:,.0f}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    shape, setup = build_setup(args)
    if args.max_seq_len:
        longest = max_seq_len(shape, setup, args.gpu_memory_gib)
        report = {"model": shape.name, "gpu_memory_gib": args.gpu_memory_gib, "max_seq_len": longest,
                  "setup": dataclasses.asdict(setup)}
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            lines = _describe(shape, setup, setup.resolved_full_layers(shape))
            print("\n".join(lines[:2] + lines[3:]))  # the step line names a seq_len, which is what is sought
            print(f"longest seq_len that fits {args.gpu_memory_gib:g} GiB: "
                  + (f"{longest:,}" if longest else "none (the model does not fit even at the shortest length)"))
        return 0
    result = estimate(shape, setup)
    if args.json:
        report = {"model": dataclasses.asdict(shape), "setup": dataclasses.asdict(setup),
                  "gpu_memory_gib": args.gpu_memory_gib, "fits": result.fits(args.gpu_memory_gib),
                  **result.to_dict()}
        print(json.dumps(report, indent=2))
    else:
        print(format_table(shape, setup, result, args.gpu_memory_gib))
    return 0


def main(argv=None) -> int:
    return run_tool(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
