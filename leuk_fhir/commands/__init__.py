"""Sub-command families of the ``leuk-fhir`` console script."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def interrupt_on_stop_signals() -> None:
    """Make SIGTERM and SIGINT raise ``KeyboardInterrupt`` in the main thread.

    Long-running commands stop cleanly on either. SIGINT is set explicitly because a process
    started in the background by a non-interactive shell (``cmd &`` in a script) inherits
    SIGINT as *ignored*, and Python then installs no Ctrl-C handler at all.
    """

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


@contextmanager
def interrupted_by_stop_signals() -> Iterator[None]:
    """:func:`interrupt_on_stop_signals` for the duration of a block (a long job inside a
    command); the handlers in place before it come back afterwards."""
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = [signal.getsignal(s) for s in stops]
    interrupt_on_stop_signals()
    try:
        yield
    finally:
        for stop, handler in zip(stops, previous, strict=True):
            signal.signal(stop, signal.SIG_DFL if handler is None else handler)
