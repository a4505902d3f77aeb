"""``python -m checkpointer``: the command line (see ``checkpointer --help``)."""

import sys

from checkpointer.cli.main import main

sys.exit(main())
