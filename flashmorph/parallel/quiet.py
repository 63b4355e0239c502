"""Third-party console noise we cannot act on, filtered narrowly (category, module, message); entry points call
`quiet_third_party()` first. Our own deprecated calls are fixed where they are made, never listed here."""

import contextlib
import io
import logging
import re
import sys
import warnings

# (category, emitting module regex, message regex) of warnings.warn calls inside dependencies
_WARNINGS = (
    # DeepSpeed's ZeRO-3 collectives call names torch has deprecated, once per step (~300 lines in the embedded
    # main job); the calls are inside DeepSpeed, flashmorph never makes them
    (FutureWarning, r"torch\.distributed\.c10d_logger",
     r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    # megatron-core (tensor parallelism) on a machine without Transformer Engine/Apex uses its torch fallbacks,
    # which is what a CPU or plain-PyTorch GPU environment wants
    (UserWarning, r"megatron\.core\.", r"Transformer Engine and Apex are not installed"),
    # peft probes `model.is_gradient_checkpointing` (deprecated in transformers 5) when it wraps a model with LoRA
    (FutureWarning, r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated"),
)

# (logger name, message regex) of log records about nothing a user can or needs to change
_LOG_RECORDS = (
    # DeepSpeed falls back to its CPU accelerator when no GPU is visible: the point of a CPU run
    ("DeepSpeed", r"Setting accelerator to CPU\."),
    # DeepSpeed JIT-loads a CPU shared-memory op through torch's extension loader, which has no CUDA to find
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
    # DeepSpeed's WarmupLR asks itself for a learning rate in its own constructor, before any step
    ("DeepSpeed", r"Attempting to get learning rate from scheduler before it has started"),
)

# stdout lines DeepSpeed prints (print(), not logging) while it sets up its CPU communication backend
STDOUT_LINES = (re.compile(r"^DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully$"),)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_third_party() -> None:
    """Install the filters above; calling it again changes nothing. A filter set on logging.getLogger(name) before
    the library creates that logger stays on it."""
    for category, module, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)  # deduplicated
    by_logger: dict[str, list[str]] = {}
    for name, pattern in _LOG_RECORDS:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropMessages)]:
            logger.removeFilter(old)
        logger.addFilter(_DropMessages(patterns))


@contextlib.contextmanager
def drop_stdout_lines(patterns=STDOUT_LINES):
    """Run a block with stdout captured, then pass on every line that matches none of `patterns`."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True)
                if not any(p.match(line.rstrip("\n")) for p in patterns)]
        sys.stdout.write("".join(kept))


@contextlib.contextmanager
def no_transformers_progress_bars():
    """transformers' own progress bars off for a block (e.g. "Writing model shards" for a one-shard tiny model)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
