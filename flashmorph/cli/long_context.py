"""Long-context finetune entry point: the distillation step on longer data, along a length curriculum.

    deepspeed --num_gpus 8 launcher/long_context.py --config recipes/llama3_8b_long_context.yaml
    python launcher/long_context.py --config recipes/embedded_long_context.yaml     # one process

Exit codes: those of launcher/distill.py; a recipe without distill.length_schedule is refused with 2.
"""

import sys

from flashmorph.cli import distill


def main(argv=None) -> int:
    return distill.main(argv, stage="long_context")


if __name__ == "__main__":
    sys.exit(main())
