"""Named points in a save or load where tests make one rank crash, fail or hang.

``CHECKPOINTER_FAILPOINT="save:before_publish@1:kill"`` makes rank 1 SIGKILL itself when it
reaches that point; actions are ``kill`` (default), ``raise`` and ``hang``; ``@*`` means
every rank. Several points are separated by commas. Unset, a failpoint costs one lookup.
"""

from __future__ import annotations

import os
import signal
import time

from checkpointer.runtime.distributed import rank

ENV = "CHECKPOINTER_FAILPOINT"


class InjectedFailure(RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


def failpoint(name: str) -> None:
    """Crash, raise or hang here if the environment asks for it on this rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, rest = item.strip().partition("@")
        target, _, action = rest.partition(":")
        if point != name or (target not in ("", "*") and int(target) != rank()):
            continue
        if action == "raise":
            raise InjectedFailure(f"failpoint {name} on rank {rank()}")
        if action == "hang":
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)
