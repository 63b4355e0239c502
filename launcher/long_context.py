"""Long-context finetune entry point: the distillation step on longer data, along a length curriculum.

    deepspeed --num_gpus 8 launcher/long_context.py --config recipes/llama3_8b_long_context.yaml
    python launcher/long_context.py --config recipes/embedded_long_context.yaml     # one process
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    # launcher/ is not a package: run distill.py's definitions (not its __main__ block), then its main as this stage
    distill = runpy.run_path(str(Path(__file__).with_name("distill.py")), run_name="distill_launcher")
    sys.exit(distill["main"](stage="long_context"))
