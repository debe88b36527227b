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
from collections.abc import Iterator
from typing import Any

#: Event names sent on ``GET /v1/events``.
ANALYSIS_EVENT = "analysis"
ALERT_EVENT = "alert"


class EventBroker:
    """Publish/subscribe of small JSON events."""

    def __init__(self, subscriber_buffer: int = 256) -> None:
        self._subscribers: set[queue.Queue[tuple[int, str, str] | None]] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._buffer = subscriber_buffer

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

    def close(self) -> None:
        """End every open stream."""
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)

    def stream(self, heartbeat_s: float = 15.0) -> Iterator[str]:
        """An SSE text stream for one client; ends when the broker closes."""
        q: queue.Queue[tuple[int, str, str] | None] = queue.Queue(self._buffer)
        with self._lock:
            self._subscribers.add(q)

        def generate() -> Iterator[str]:
            try:
                yield "retry: 3000\nevent: hello\ndata: {}\n\n"
                while True:
                    try:
                        message = q.get(timeout=heartbeat_s)
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
