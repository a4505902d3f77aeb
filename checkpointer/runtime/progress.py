"""Progress bars for long transfers: rank 0 only, and only on a terminal unless asked."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from tqdm.auto import tqdm

from checkpointer.runtime.distributed import rank

_forced: list[bool] = []  # innermost progress_bars(...) setting


@contextlib.contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """Within the block, bars are on (rank 0 only) or off whatever the terminal (e.g. ``--quiet``)."""
    _forced.append(show)
    try:
        yield
    finally:
        _forced.pop()


def show_progress() -> bool:
    """Bars on rank 0 when stderr is a terminal; CHECKPOINTER_PROGRESS=1/0 or progress_bars() force them on/off."""
    forced = os.environ.get("CHECKPOINTER_PROGRESS")
    if _forced:
        return _forced[-1] and rank() == 0
    if forced is not None:
        return forced == "1" and rank() == 0
    return rank() == 0 and sys.stderr.isatty()


def byte_bar(total: int, description: str) -> tqdm:
    """A bar counting bytes (a no-op object when bars are off)."""
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress())


def human_size(nbytes: int | None) -> str:
    """Bytes in Hugging Face's decimal units: ``1234567`` -> ``"1.23 MB"`` (``"?"`` for None)."""
    if nbytes is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"
