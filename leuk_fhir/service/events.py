"""Server-Sent Events: a small in-process broker fanning analysis events out to browsers.

Events carry ids and statuses only, never patient data. Each subscriber has a bounded queue; a
subscriber that stops reading loses events rather than slowing the workers down.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from leuk_fhir.errors import ServiceBusyError

#: Event names sent on ``GET /v1/events``.
ANALYSIS_EVENT = "analysis"
ALERT_EVENT = "alert"


#: Open streams at most: each holds a server thread (``serve`` adds this many threads to the
#: ones requests use, so health checks and uploads are always answered).
MAX_STREAMS = 32
#: A stream ends after this long and the browser reconnects, signing in again (a revoked
#: token's stream does not outlive it by more than this).
STREAM_MAX_AGE_S = 300.0


class EventBroker:
    """Publish/subscribe of small JSON events."""

    def __init__(self, subscriber_buffer: int = 256, max_streams: int = MAX_STREAMS) -> None:
        self._subscribers: set[queue.Queue[tuple[int, str, str] | None]] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._buffer = subscriber_buffer
        self.max_streams = max_streams

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        message = (next(self._ids), event, json.dumps(data, separators=(",", ":")))
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            # A stalled client misses events; the page re-reads the list on reconnect.
            with contextlib.suppress(queue.Full):
                q.put_nowait(message)

    def close(self, wait_s: float = 0.0) -> None:
        """End every open stream; wait up to ``wait_s`` until their generators have ended."""
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)
        deadline = time.monotonic() + wait_s
        while self._subscribers and time.monotonic() < deadline:
            time.sleep(0.02)

    def stream(self, heartbeat_s: float = 15.0, max_age_s: float = STREAM_MAX_AGE_S) -> Iterator[str]:
        """An SSE text stream for one client; ends when the broker closes or after
        ``max_age_s``. :class:`ServiceBusyError` when ``max_streams`` are open already."""
        q: queue.Queue[tuple[int, str, str] | None] = queue.Queue(self._buffer)
        with self._lock:
            if len(self._subscribers) >= self.max_streams:
                raise ServiceBusyError(
                    f"{self.max_streams} live event streams are open already",
                    hint="close other pages of leuk-fhir; this page retries by itself",
                )
            self._subscribers.add(q)
        deadline = time.monotonic() + max_age_s

        def generate() -> Iterator[str]:
            try:
                yield "retry: 3000\nevent: hello\ndata: {}\n\n"
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    try:
                        message = q.get(timeout=min(heartbeat_s, left))
                    except queue.Empty:
                        yield ": keep-alive\n\n"
                        continue
                    if message is None:
                        return
                    event_id, event, data = message
                    yield f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"
            finally:
                with self._lock:
                    self._subscribers.discard(q)

        return generate()
