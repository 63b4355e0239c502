"""Long-context finetune entry point: the distillation step on longer data, along a length curriculum.

    deepspeed --num_gpus 8 launcher/long_context.py --config recipes/llama3_8b_long_context.yaml
    python launcher/long_context.py --config recipes/embedded_long_context.yaml     # one process
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launcher/ is not a package; share distill's CLI

from distill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stage="long_context"))
