"""The ``checkpointer`` command line (``checkpointer --help``)."""

from checkpointer.cli.main import main

__all__ = ["main"]
