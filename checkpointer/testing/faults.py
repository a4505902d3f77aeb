"""Faults that test servers inject into their answers: an HTTP status, a reset, a delay, a cut body."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass


@dataclass
class Fault:
    """A queued fault: fires on requests whose method and raw path match, ``times`` times."""

    method: str
    pattern: re.Pattern
    status: int | None = None
    reset: bool = False
    delay: float = 0.0
    truncate: bool = False
    times: int = 1


class FaultQueue:
    """Thread-safe queue of faults, consumed by the requests they match."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def inject(self, method: str, path_regex: str, *, status: int | None = None, reset: bool = False,
               delay: float = 0.0, truncate: bool = False, times: int = 1) -> None:
        """Queue a fault for the next ``times`` requests of ``method`` (or "*") whose raw path matches.

        ``status`` answers that HTTP status; ``reset`` closes the connection without an answer; ``delay``
        sleeps that many seconds first; ``truncate`` sends the headers and only half of the body.
        """
        if status is None and not (reset or delay or truncate):
            raise ValueError("A fault needs status, reset, delay or truncate")
        with self._lock:
            self._faults.append(Fault(method.upper(), re.compile(path_regex), status, reset, delay, truncate, times))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault matching this request (consumed once), or None."""
        with self._lock:
            for fault in self._faults:
                if fault.method in (method, "*") and fault.pattern.search(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None
