"""The commands of the ``checkpointer`` command line, one module per family.

``checkpointer.cli`` parses the arguments and calls these functions; each returns an
:class:`~checkpointer.commands.common.Outcome` (exit code and one summary line) or raises
a :class:`~checkpointer.errors.CheckpointError` whose message says what to do next.
"""
