"""Exceptions raised by checkpointer: one base class, so callers can catch them all.

Every subclass also inherits the builtin it is, as huggingface_hub's errors do
(``HfHubHTTPError(HTTPError, OSError)``): code that catches ``ValueError`` for bad input
(as torchtune's does) or ``FileNotFoundError`` for a missing file catches ours too.
Each error carries what it is about as fields, where known: ``url`` (the location's
address), ``file`` (the file, as the message names it: a path or a URL) and ``key`` (a
tensor, field or argument name). The message says the same in words.

Errors travel between ranks as objects (pickled), so their class and fields survive;
see ``checkpointer.runtime.distributed``.
"""

from __future__ import annotations

import copy


class CheckpointError(Exception):
    """A checkpoint could not be loaded, saved or published; the message says what and where."""

    def __init__(self, message: str = "", *, url: str | None = None, file: str | None = None, key: str | None = None):
        super().__init__(message)
        self.url = url
        self.file = file
        self.key = key

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def with_message(self, message: str) -> CheckpointError:
        """A copy of this error (same class, same fields) that says ``message``."""
        clone = copy.copy(self)
        clone.args = (message,)
        return clone


class CheckpointFormatError(CheckpointError, ValueError):
    """A file is not valid safetensors, or an index or config does not describe the files."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint and the model disagree: missing or unexpected keys, shapes, model type."""


class CheckpointArgumentError(CheckpointError, ValueError):
    """An argument is not valid: a URL, a model type, a size, a dtype, a state dict entry."""


class CheckpointUnsupportedError(CheckpointError, NotImplementedError):
    """A valid request this version cannot carry out (e.g. a shard layout it cannot write)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A file, folder, repository or revision does not exist where the checkpoint or the caller says it is."""


class CheckpointAccessError(CheckpointError, PermissionError):
    """The location refuses access: a gated or private repository, a missing or wrong token."""


class CheckpointTransportError(CheckpointError, OSError):
    """Moving bytes failed (after retries): the network, a server, an upload, a disk that is full."""


class ChatTemplateError(CheckpointFormatError):
    """The tokenizer folder has no chat template, or the template cannot give per-message token spans."""


ERRORS: tuple[type[CheckpointError], ...] = (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointArgumentError,
    CheckpointUnsupportedError,
    CheckpointNotFoundError,
    CheckpointAccessError,
    CheckpointTransportError,
    ChatTemplateError,
)
