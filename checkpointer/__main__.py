"""``python -m checkpointer``: the command line (see ``checkpointer --help``)."""

import sys

from checkpointer.cli import main

sys.exit(main())
