"""Exceptions raised by checkpointer: one base class, so callers can catch them all."""


class CheckpointError(Exception):
    """A checkpoint could not be loaded, saved or published; the message says what and where."""


class CheckpointFormatError(CheckpointError):
    """A file is not valid safetensors, or an index or config does not describe the files."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint and the model disagree: missing or unexpected keys, shapes, model type."""
