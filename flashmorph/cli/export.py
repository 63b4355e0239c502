"""Export a hybrid model as a standard HF directory that `flashmorph.load_hybrid` loads and generates with.

    python tools/export.py --model runs/embedded/teacher --layout runs/embedded/hybrid.json --out exports/embedded
"""

import argparse
import sys

from flashmorph.errors import FlashMorphError
from flashmorph.parallel.quiet import quiet_third_party


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write a hybrid softmax/linear model as a HF directory.")
    parser.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--layout", required=True, help="hybrid.json from tools/discretize_gates.py")
    parser.add_argument("--out", required=True, help="output directory; must be absent or empty unless --force")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's own)")
    parser.add_argument("--recipe", default=None,
                        help="recipe or run config.yaml whose morph section set the linear branch (default: defaults)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_third_party()
    try:
        # torch-free checks first, so a bad model directory or layout is refused in a fraction of a second
        from flashmorph.model.hf_dir import validate_model_dir
        from flashmorph.model.layout import read_layout

        shape = validate_model_dir(args.model, f"--model {args.model}")
        read_layout(args.layout, shape.num_layers)
        # imported here so that --help and argument errors answer without loading torch
        from flashmorph.export import export_hybrid

        morph_config = None
        if args.recipe is not None:
            from flashmorph.config import load_recipe

            morph_config = load_recipe(args.recipe).morph
        out = export_hybrid(args.model, args.layout, args.out, dtype=args.dtype, force=args.force,
                            morph_config=morph_config)
    except FlashMorphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported hybrid model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
