"""Stop requests: SIGINT and SIGTERM (a cluster's notice before pre-emption) ask a run to finish its step, write
a checkpoint and stop; a second signal interrupts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StopRequestedError(Exception):
    """SIGINT or SIGTERM arrived: the current step finished and a checkpoint was written."""


class StopSignals:
    """Catches SIGINT and SIGTERM while :meth:`installed` is active (only in the main thread; elsewhere signals
    keep their handlers). ``received`` is the first signal's number, or None."""

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self.received: int | None = None
        self._announce = announce

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        """The received signal's name (SIGTERM when none was: a stop agreed because another rank got one)."""
        return signal.Signals(self.received or signal.SIGTERM).name

    def _handler(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        if self._announce is not None:
            self._announce(f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                           "(send it again to stop at once)")

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in before:
            signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, h in before.items():
                signal.signal(s, h)


__all__ = ["StopRequestedError", "StopSignals"]
