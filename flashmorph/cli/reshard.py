"""Convert model weights between ZeRO-3 checkpoints, consolidated HF safetensors and megatron-core TP shards.

    python tools/reshard.py --from zero3 --to hf --src runs/x/checkpoints/step_100 --dst out/hf --config models/llama
    python tools/reshard.py --from hf --to tp --src out/hf --dst out/tp8 --tp 8
    python tools/reshard.py --from tp --to hf --src out/tp8 --dst out/hf2
    python tools/reshard.py --from hf --to zero3 --src out/hf2 --dst out/zero3_dp4 --dp 4
    deepspeed --num_gpus 8 tools/reshard.py --from hf --to zero3 --src out/hf2 --dst out/zero3_dp8   # DP = world

Memory (host RAM above the ~0.3 GB of imports; measured on 182M- and 430M-parameter models whose largest tensor is
125 MiB: the peaks did not change with model size). The file pages of the memory-mapped sources also show in RSS,
but they are page cache the kernel drops under pressure.
  hf -> tp:     one full tensor plus its TP pieces (cut on dim 0 they are views): 1.3x the largest tensor.
  tp -> hf:     the TP pieces plus the merged tensor: 2.5x the largest tensor.
  zero3 -> hf:  deepspeed's zero_to_fp32 in lazy mode, rank files memory-mapped: one fp32 tensor at a time,
                2.3x the largest fp32 tensor (2.9x when cast to bf16). Frozen weights, if the checkpoint has any,
                are consolidated all at once by deepspeed.
  * -> zero3:   this process as above; then every rank holds its 1/DP share through a DeepSpeed engine: about
                16 bytes per parameter of that share for a bf16 model (21 for fp32) plus 0.5 GB of imports, i.e.
                ~16 bytes x parameters over the whole world (70B bf16: ~1.1 TB, so spread it over hosts with a
                launcher). A non-HF source is first written as a temporary HF directory next to --dst.
"""

import argparse
import logging
import os
import sys

from flashmorph.cli._tool import ArgumentParser, fail

FORMATS = ("zero3", "hf", "tp")  # mirrored from flashmorph.checkpoint.reshard, which imports torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="format of --src")
    parser.add_argument("--to", dest="dst_format", required=True, choices=FORMATS, help="format to write")
    parser.add_argument("--src", required=True, help="source directory (for zero3: the one holding `latest` or "
                                                     "the tag directory `state/`, e.g. checkpoints/step_N)")
    parser.add_argument("--dst", required=True, help="output directory; must be absent or empty unless --force")
    parser.add_argument("--tp", type=int, help="--to tp: tensor-parallel size (must divide heads, kv heads, vocab "
                                               "and intermediate size)")
    parser.add_argument("--dp", type=int, help="--to zero3: data-parallel size of the checkpoint (default 1; under "
                                               "a launcher the world size, which --dp must then equal)")
    parser.add_argument("--config", help="HF model directory whose config.json (and tokenizer) describe the model "
                                         "(default: --src; needed for ZeRO-3 checkpoints written by training)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest HF safetensors file written (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --dst")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dst_format != "zero3" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: --to hf/tp runs in one process; start it with python, not a multi-rank launcher", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from flashmorph.errors import FlashMorphError
    from flashmorph.parallel.quiet import quiet_third_party

    quiet_third_party()
    try:
        # imported here so that --help and argument errors answer without loading torch
        from flashmorph.checkpoint.reshard import reshard

        out = reshard(args.src_format, args.dst_format, args.src, args.dst, tp=args.tp, dp=args.dp,
                      config_dir=args.config, force=args.force, max_shard_size=args.max_shard_size,
                      show_progress=not args.no_progress)
    except FlashMorphError as err:
        return fail(err)
    print(f"wrote {args.dst_format} checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
