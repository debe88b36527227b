"""Sub-command families of the ``leuk-fhir`` console script."""

from __future__ import annotations

import signal
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
