"""Giving the worker's freed heap back to the system after many connections (streams) have closed; glibc keeps it."""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable

#: Client connections open at once since the last trim before a trim is worth it: a trim walks the whole heap, and a
#: worker that serves a steady few connections reuses what it freed.
OPEN_FOR_TRIM = 256
#: A trim waits this long after the closes that call for it, so that one trim follows a burst of them.
TRIM_DELAY = 0.5
#: And the trim itself waits this long after the collection that precedes it.
COLLECTED_DELAY = 0.1


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (musl, macOS)."""
    try:
        # The C library the process already has loaded: no search (find_library would run ldconfig in a subprocess).
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class HeapTrimmer:
    """Calls malloc_trim(0) after many client connections were open at once (OPEN_FOR_TRIM) and half of them have
    closed, then each time half of the rest have, and when the last has (the gunicorn worker counts them).

    An open stream's buffers, greenlet stack and parsed headers live in glibc's heap; when they are freed glibc keeps
    the pages for later allocations, so a worker that once held thousands of idle streams would hold their memory for
    good. For gunicorn's gevent worker (worker.py): the trim runs on the hub's timer, not in a request.
    """

    def __init__(self) -> None:
        self._open = self._peak = 0
        self._burst = False  # OPEN_FOR_TRIM were open at once, and not all have closed since
        self._timer: object = None

    def opened(self, open_now: int) -> None:
        self._open, self._peak = open_now, max(self._peak, open_now)
        if self._peak >= OPEN_FOR_TRIM:
            self._burst = True

    def closed(self, open_now: int) -> None:
        self._open = open_now
        if self._timer is not None or not self._burst or open_now * 2 > self._peak:
            return
        if _malloc_trim() is None:
            return
        from gevent import get_hub

        timer = self._timer = get_hub().loop.timer(TRIM_DELAY)
        timer.start(self._trim)

    def _trim(self) -> None:
        # Cycles among a closed stream's objects (frames, exceptions and their tracebacks) wait for the collector's
        # oldest generation, which a quiet worker may not reach for long; collected first, their memory is trimmed too.
        gc.collect()
        # Not at once: the sockets just collected close through callbacks that gevent's hub runs next (their watchers
        # and buffers are freed then). Trimmed in the same pass, a worker kept ~120 MiB more after 10,000 streams.
        from gevent import get_hub

        timer = self._timer = get_hub().loop.timer(COLLECTED_DELAY)
        timer.start(self._release)

    def _release(self) -> None:
        self._timer = None
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
        # Again when half of those still open have closed, and last when none is.
        self._peak = self._open
        self._burst = self._open > 0


trimmer = HeapTrimmer()
