"""Project exception types: every user-facing failure is one of these, with a one-line message."""

from pathlib import Path


class FlashMorphError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(FlashMorphError):
    """A recipe or override is invalid; the message names the field and the fix."""


class CheckpointError(FlashMorphError):
    """A checkpoint is missing, incomplete or corrupted."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file  # the damaged file (relative to its checkpoint, or a path), when one file is to blame


class Preempted(Exception):
    """Raised by a stage after it saved the checkpoint of `step` because a stop signal arrived; not an error.

    Here, not in training/preemption.py, because parallel.distributed.run_on_main re-raises it on every rank."""

    def __init__(self, step: int, checkpoint: Path, reason: str):
        self.step, self.checkpoint, self.reason = step, Path(checkpoint), reason
        super().__init__(f"stopped at step {step} on {reason}; complete checkpoint {self.checkpoint}; "
                         "rerun the same command with --resume to continue")


def check_choice(field: str, value, choices) -> None:
    """The one "unknown value" rule: a one-line ConfigError naming the field, the value and every valid choice."""
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is unknown; use one of {', '.join(str(c) for c in choices)}")
