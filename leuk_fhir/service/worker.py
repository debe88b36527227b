"""Background analysis workers fed by a bounded admission queue.

Admission is bounded (``ServiceSettings.queue_size`` analyses waiting or running); a caller
first :meth:`AnalysisQueue.reserve`\\ s a place, persists the upload and the job row, then
:meth:`AnalysisQueue.commit`\\ s the id. When no place is free, :class:`QueueFullError` (503 with
Retry-After) is raised before anything is written. Jobs recovered from the database at start-up
are queued whatever the bound, so nothing accepted is ever dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from leuk_fhir.errors import QueueFullError

log = logging.getLogger(__name__)

_STOP = object()


class AnalysisQueue:
    """A fixed pool of worker threads calling ``process(analysis_id)`` for each queued id."""

    def __init__(
        self,
        process: Callable[[str], None],
        *,
        workers: int,
        capacity: int,
        retry_after_s: int = 5,
    ) -> None:
        if workers < 1 or capacity < 1:
            raise ValueError("workers and capacity must be at least 1")
        self._process = process
        self._workers = workers
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self._ids: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # reserved + queued + running
        self._running = 0
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def pending(self) -> int:
        """Analyses reserved, waiting or running."""
        return self._pending

    @property
    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def start(self, recovered_ids: list[str] | None = None) -> None:
        """Queue ``recovered_ids`` (unfinished jobs from a previous run), then start workers."""
        recovered_ids = recovered_ids or []
        self._stopping.clear()
        with self._lock:
            for analysis_id in recovered_ids:
                self._pending += 1
                self._ids.put(analysis_id)
        for i in range(self._workers):
            thread = threading.Thread(target=self._loop, name=f"leuk-fhir-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if recovered_ids:
            log.info("re-queued %d unfinished analyses", len(recovered_ids))

    def reserve(self) -> None:
        """Take one place in the queue or raise :class:`QueueFullError`."""
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFullError(
                    f"the analysis queue is full ({self.capacity} waiting or running)",
                    retry_after_s=self.retry_after_s,
                    hint="retry after the delay in the Retry-After header",
                )
            self._pending += 1

    def release(self) -> None:
        """Give back a reserved place that will not be committed."""
        with self._lock:
            self._pending = max(0, self._pending - 1)

    def commit(self, analysis_id: str) -> None:
        """Queue a persisted analysis into a reserved place."""
        self._ids.put(analysis_id)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let running analyses finish (up to ``timeout_s``); queued ones stay in the database."""
        self._stopping.set()
        for _ in self._threads:
            self._ids.put(_STOP)
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []

    def _loop(self) -> None:
        while True:
            item = self._ids.get()
            if item is _STOP or self._stopping.is_set():
                return  # a queued id stays 'queued' in the database and is re-queued next start
            analysis_id = str(item)
            with self._lock:
                self._running += 1
            try:
                self._process(analysis_id)
            except Exception:  # the process callback records failures; never kill the worker
                log.exception("worker crashed on analysis %s", analysis_id)
            finally:
                with self._lock:
                    self._running -= 1
                    self._pending = max(0, self._pending - 1)
