"""Byte pieces of memory moved to and from files in one system call per batch (``preadv``/``pwritev``).

A tensor whose rows are contiguous but scattered (a transposed block of RoPE heads) is a
list of pieces, one per row; these functions read into and write from such lists as if
they were one buffer, and cut them at the byte runs of a file without copying.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from checkpointer.format.box_runs import ByteRun

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


def flat(pieces: Sequence[memoryview]) -> list[memoryview]:
    """``pieces`` as one-dimensional byte views (no copies)."""
    return [p if p.format == "B" and p.ndim == 1 else p.cast("B") for p in pieces]


def byte_count(pieces: Sequence[memoryview]) -> int:
    """The bytes ``pieces`` hold together."""
    return sum(piece.nbytes for piece in pieces)


def _transfer_all(call: Callable[[int, list[memoryview], int], int], fd: int, pieces: Sequence[memoryview], offset: int) -> int:
    """Run ``call`` (``os.preadv`` or ``os.pwritev``) until every piece is done or it moves 0 bytes; the bytes moved."""
    pending = flat(pieces)
    done, first = 0, 0
    while first < len(pending):
        batch = pending[first : first + _IOV_MAX]
        size = byte_count(batch)
        moved = call(fd, batch, offset + done)
        if moved == 0 and size:  # the end of the file (a read)
            return done
        done += moved
        if moved == size:  # the usual case: everything went
            first += len(batch)
            continue
        while moved >= len(pending[first]):
            moved -= len(pending[first])
            first += 1
        pending[first] = pending[first][moved:]
    return done


def pwritev_all(fd: int, pieces: Sequence[memoryview], offset: int) -> int:
    """Write ``pieces`` back to back from ``offset``; returns the bytes written."""
    return _transfer_all(os.pwritev, fd, pieces, offset)


def preadv_all(fd: int, pieces: Sequence[memoryview], offset: int) -> int:
    """Fill ``pieces`` back to back with the bytes from ``offset``; returns the bytes read (fewer at the file's end)."""
    return _transfer_all(os.preadv, fd, pieces, offset)


def pwrite_runs(fd: int, pieces: Sequence[memoryview], runs: Sequence[ByteRun]) -> int:
    """Write ``pieces`` (bytes back to back) along the file ``runs``; returns the bytes written."""
    return _transfer_runs(os.pwrite, pwritev_all, fd, pieces, runs)


def preadv_runs(fd: int, pieces: Sequence[memoryview], runs: Sequence[ByteRun]) -> int:
    """Fill ``pieces`` (back to back) with the bytes of the file ``runs``; returns the bytes read (fewer at the file's end)."""
    return _transfer_runs(lambda fd, piece, offset: os.preadv(fd, [piece], offset), preadv_all, fd, pieces, runs)


def _transfer_runs(
    one: Callable[[int, memoryview, int], int], every: Callable, fd: int, pieces: Sequence[memoryview], runs: Sequence[ByteRun]
) -> int:
    """Move each run with ``every`` (``preadv_all``/``pwritev_all``) over its pieces; the bytes moved.

    One contiguous buffer cut into many runs (a column box's rows) takes one system call per
    run (``one``) and no lists of pieces, unless a call moves less than its run.
    """
    if len(pieces) != 1 or len(runs) == 1:
        return sum(every(fd, part, offset) for (offset, _), part in zip(runs, split_pieces(pieces, runs)))
    data, at, moved = flat(pieces)[0], 0, 0
    for offset, length in runs:
        done = one(fd, data[at : at + length], offset)
        if done < length:  # rare for a file: finish the run the general way (a read may end at the file's end)
            done += every(fd, [data[at + done : at + length]], offset + done)
        at, moved = at + length, moved + done
    return moved


def fill_pieces(pieces: Sequence[memoryview], data: memoryview | bytes) -> None:
    """Copy ``data`` into ``pieces`` back to back (their lengths add up to its length)."""
    data, at = memoryview(data).cast("B"), 0
    for piece in flat(pieces):
        piece[:] = data[at : at + len(piece)]
        at += len(piece)


def split_pieces(pieces: Sequence[memoryview], runs: Sequence[ByteRun]) -> list[list[memoryview]]:
    """``pieces`` (bytes back to back) cut at the run boundaries: the pieces of each run, without copies."""
    pending = flat(pieces)
    if len(runs) == 1:  # a box of whole rows: one run holds every piece (RoPE q/k views have a piece per row)
        return [pending]
    split, index, used = [], 0, 0  # ``used``: bytes of pending[index] already handed out
    for _, length in runs:
        batch, need = [], length
        while need:
            piece = pending[index][used : used + need]
            batch.append(piece)
            need -= len(piece)
            used += len(piece)
            if used == len(pending[index]):
                index, used = index + 1, 0
        split.append(batch)
    return split
