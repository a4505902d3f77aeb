"""Retrying remote operations that fail for passing reasons (resets, timeouts, 5xx, 429)."""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) or getattr(error, "status_code", None) or getattr(error, "code", None)


def is_transient(error: BaseException) -> bool:
    """Connection resets, timeouts and server-side (5xx) or rate-limit (429) answers."""
    status = _status(error)
    if isinstance(status, int):
        return status in _TRANSIENT_STATUS
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    module = type(error).__module__.split(".")[0]
    name = type(error).__name__
    transport = ("Timeout", "Network", "Connect", "RemoteProtocol", "ReadError", "WriteError", "Protocol")
    return module in ("httpx", "httpx2", "aiohttp", "botocore", "urllib3") and any(t in name for t in transport)


def with_retries(
    operation: Callable[[], T], what: str, attempts: int = 4, first_delay: float = 0.5, max_delay: float = 8.0
) -> T:
    """Call ``operation``; on a transient error wait (doubling) and try again, up to ``attempts`` times."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as e:  # noqa: BLE001 - classified just below
            if attempt == attempts or not is_transient(e):
                raise
            log.warning("%s failed (%s: %s); retrying in %.1f s (%d/%d)", what, type(e).__name__, e, delay, attempt, attempts)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")
