"""Project exception types: every user-facing failure is one of these, with a one-line message."""


class FlashMorphError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(FlashMorphError):
    """A recipe or override is invalid; the message names the field and the fix."""


class CheckpointError(FlashMorphError):
    """A checkpoint is missing, incomplete or corrupted."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file  # the damaged file (relative to its checkpoint, or a path), when one file is to blame
