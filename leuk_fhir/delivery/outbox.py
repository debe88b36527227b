"""A durable outbox for Bundles bound for the EHR, and the sender that drains it.

The outbox is one SQLite file in WAL mode with ``synchronous=FULL``: :meth:`Outbox.enqueue`
returns only after the Bundle is on disk, so whoever is told "accepted" can rely on it.
Deliveries move ``pending -> sending -> delivered``, or to ``dead`` (a dead letter, keeping
the server's OperationOutcome) when the EHR refuses in a way retrying cannot fix or when the
attempts run out. A ``sending`` delivery whose lease expired (its sender crashed or was
killed) is picked up again; a live sender renews its lease while it sends, and only the lease
owner can record the outcome. Resending is safe: every Bundle is made of conditional creates /
updates, so a send whose answer was lost creates nothing new the second time. A delivery whose
dependency (``depends_on``) became a dead letter becomes one too, and comes back with it on
:meth:`Outbox.retry`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from leuk_fhir.delivery.client import EhrClient, EhrEndpointError
from leuk_fhir.errors import DeliveryError, InputError, NotFoundError
from leuk_fhir.settings import OutboxSettings

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    bundle TEXT NOT NULL,
    depends_on TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    lease_owner TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    last_status INTEGER,
    last_error TEXT,
    operation_outcome TEXT,
    response TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
"""

#: SQL condition: delivery ``d`` has no dependency, or its dependency is delivered.
_READY = ("(d.depends_on IS NULL OR EXISTS (SELECT 1 FROM deliveries p "
          "WHERE p.key = d.depends_on AND p.status = 'delivered'))")
_DEAD_DEPENDENCY = "depends on dead letter"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True)
class Delivery:
    """One Bundle on its way to the EHR. ``bundle`` is only loaded by :meth:`Outbox.get`."""

    id: int
    key: str
    kind: str
    status: DeliveryStatus
    attempts: int
    created_at: float
    updated_at: float
    next_attempt_at: float
    delivered_at: float | None = None
    depends_on: str | None = None
    last_status: int | None = None
    last_error: str | None = None
    operation_outcome: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    bundle: dict[str, Any] | None = None

    def as_dict(self, with_bundle: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "bundle"}
        out["status"] = str(self.status)
        if with_bundle:
            out["bundle"] = self.bundle
        return out


_LIST_COLUMNS = ("id, key, kind, status, attempts, created_at, updated_at, next_attempt_at, "
                 "delivered_at, depends_on, last_status, last_error, operation_outcome, response")


def _row(row: sqlite3.Row, with_bundle: bool = False) -> Delivery:
    return Delivery(
        id=row["id"], key=row["key"], kind=row["kind"], status=DeliveryStatus(row["status"]),
        attempts=row["attempts"], created_at=row["created_at"], updated_at=row["updated_at"],
        next_attempt_at=row["next_attempt_at"], delivered_at=row["delivered_at"],
        depends_on=row["depends_on"], last_status=row["last_status"], last_error=row["last_error"],
        operation_outcome=json.loads(row["operation_outcome"]) if row["operation_outcome"] else None,
        response=json.loads(row["response"]) if row["response"] else None,
        bundle=json.loads(row["bundle"]) if with_bundle else None,
    )


class Outbox:
    """The durable queue (see module docstring). Safe to share between threads and processes."""

    def __init__(self, path: Path | str, *, lease_s: float = 120.0, wal: bool = True,
                 clock: Callable[[], float] = time.time, create: bool = True) -> None:
        """Open (or, with ``create``, create) the outbox at ``path``."""
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise NotFoundError(f"no outbox at {self.path}", hint="check --outbox / the data directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            if wal:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> _Tx:
        return _Tx(self)

    # ------------------------------------------------------------------ producers

    def enqueue(self, key: str, bundle: dict[str, Any], kind: str = "report", *,
                depends_on: str | None = None) -> int:
        """Store ``bundle`` durably under ``key``; returns the delivery id.

        Idempotent on ``key``: enqueueing a key that is already there returns the existing
        delivery (use :meth:`retry` to send a dead letter again). ``depends_on`` names the key
        of a delivery that must be delivered first (an alert after its report).
        """
        if not key:
            raise InputError("an outbox key must not be empty")
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InputError("only FHIR Bundles can be enqueued")
        body = json.dumps(bundle, separators=(",", ":"))
        now = self._clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO deliveries (key, kind, bundle, depends_on, status, next_attempt_at, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?) "
                "ON CONFLICT(key) DO NOTHING",
                (key, kind, body, depends_on, now, now, now),
            )
            row = db.execute("SELECT id FROM deliveries WHERE key = ?", (key,)).fetchone()
        return int(row["id"])

    # ------------------------------------------------------------------ queries

    def get(self, delivery_id: int) -> Delivery:
        with self._lock:
            row = self._db.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no delivery {delivery_id} in the outbox {self.path}")
        return _row(row, with_bundle=True)

    def get_by_key(self, key: str) -> Delivery:
        with self._lock:
            row = self._db.execute("SELECT * FROM deliveries WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise NotFoundError(f"no delivery with key {key!r} in the outbox {self.path}")
        return _row(row, with_bundle=True)

    def blocked(self) -> list[Delivery]:
        """Pending deliveries waiting for a dependency that is not delivered (yet)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join('d.' + c for c in _LIST_COLUMNS.split(', '))} "
                                    f"FROM deliveries d WHERE d.status = 'pending' AND NOT {_READY} "
                                    "ORDER BY d.id").fetchall()
        return [_row(r) for r in rows]

    def list(self, status: DeliveryStatus | str | None = None, *, limit: int = 100,
             offset: int = 0) -> list[Delivery]:
        """Deliveries (without their Bundles), newest first; optionally of one status."""
        sql = f"SELECT {_LIST_COLUMNS} FROM deliveries"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (str(DeliveryStatus(status)),)
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit, offset)).fetchall()
        return [_row(r) for r in rows]

    def stats(self) -> dict[str, Any]:
        """Counts per status, ``blocked`` (pending, waiting for an undelivered dependency) and
        the age of the oldest undelivered Bundle, in seconds."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) n FROM deliveries GROUP BY status").fetchall()
            oldest = self._db.execute(
                "SELECT MIN(created_at) t FROM deliveries WHERE status IN ('pending', 'sending')"
            ).fetchone()["t"]
            blocked = self._db.execute(
                f"SELECT COUNT(*) FROM deliveries d WHERE d.status = 'pending' AND NOT {_READY}").fetchone()[0]
        out: dict[str, Any] = {s.value: 0 for s in DeliveryStatus}
        out.update({r["status"]: r["n"] for r in rows})
        out["blocked"] = blocked
        out["oldest_pending_age_s"] = None if oldest is None else max(0.0, self._clock() - oldest)
        return out

    def undelivered(self) -> int:
        with self._lock:
            return int(self._db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE status IN ('pending', 'sending')").fetchone()[0])

    def next_due_in(self) -> float | None:
        """Seconds until the next delivery can be claimed (0: now); None if none can (deliveries
        waiting for a dependency that is not pending or sending do not count)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(CASE d.status WHEN 'pending' THEN d.next_attempt_at ELSE d.lease_until END) t "
                f"FROM deliveries d WHERE d.status = 'sending' OR (d.status = 'pending' AND {_READY})").fetchone()
        return None if row["t"] is None else max(0.0, row["t"] - self._clock())

    # ------------------------------------------------------------------ operators

    def retry(self, delivery_id: int) -> Delivery:
        """Resubmit a dead letter (or hurry a pending one): pending, due now, attempts reset.
        Deliveries that died only because they depend on this one are resubmitted with it."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute("SELECT key, status FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no delivery {delivery_id} in the outbox {self.path}")
            if row["status"] in ("dead", "pending"):
                db.execute(
                    "UPDATE deliveries SET status='pending', attempts=0, next_attempt_at=?, "
                    "updated_at=? WHERE id=?", (now, now, delivery_id))
                # transitively: a dependant's dependants died with it
                db.execute(
                    "WITH RECURSIVE dependants(key) AS (SELECT :key UNION SELECT d.key FROM deliveries d "
                    "JOIN dependants ON d.depends_on = dependants.key "
                    "WHERE d.status = 'dead' AND d.last_error LIKE :why) "
                    "UPDATE deliveries SET status='pending', attempts=0, next_attempt_at=:now, updated_at=:now "
                    "WHERE key IN (SELECT key FROM dependants) AND key != :key",
                    {"key": row["key"], "why": f"{_DEAD_DEPENDENCY} %", "now": now})
        return self.get(delivery_id)

    def _bury_orphans(self, db: sqlite3.Connection, now: float) -> None:
        """Dead-letter pending deliveries whose dependency is a dead letter (transitively).

        Runs on every claim: it looks at pending deliveries with a dependency only, each one's
        dependency found through the unique key (never a scan of all dead letters)."""
        while True:
            n = db.execute(
                f"UPDATE deliveries SET status='dead', updated_at=:now, lease_until=NULL, last_status=NULL, "
                f"last_error='{_DEAD_DEPENDENCY} ' || (SELECT p.id FROM deliveries p WHERE p.key = "
                "deliveries.depends_on) || ' (' || depends_on || '); retry that one to resend both' "
                "WHERE status = 'pending' AND depends_on IS NOT NULL AND EXISTS (SELECT 1 FROM deliveries p "
                "WHERE p.key = deliveries.depends_on AND p.status = 'dead')",
                {"now": now}).rowcount
            if n <= 0:
                return
            log.warning("%d deliveries moved to dead letters: their dependency is a dead letter", n)

    # ------------------------------------------------------------------ the sender's side

    def claim(self, owner: str, lease_s: float | None = None) -> Delivery | None:
        """Lease the next due delivery to ``owner`` (attempts + 1); None when nothing is due."""
        now = self._clock()
        lease = self.lease_s if lease_s is None else lease_s
        with self._tx() as db:
            self._bury_orphans(db, now)
            row = db.execute(
                f"""SELECT id FROM deliveries d
                   WHERE ((d.status = 'pending' AND d.next_attempt_at <= :now)
                          OR (d.status = 'sending' AND d.lease_until < :now))
                     AND {_READY}
                   ORDER BY d.next_attempt_at, d.id LIMIT 1""", {"now": now}).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE deliveries SET status='sending', attempts=attempts+1, lease_until=?, "
                "lease_owner=?, updated_at=? WHERE id=?", (now + lease, owner, now, row["id"]))
            full = db.execute("SELECT * FROM deliveries WHERE id = ?", (row["id"],)).fetchone()
        return _row(full, with_bundle=True)

    # The mark_* / renew / release updates apply only while ``owner`` holds the claim; they
    # return False (and change nothing) when the lease was lost to another sender.

    def _owned(self, sql: str, args: tuple[Any, ...], delivery_id: int, owner: str) -> bool:
        with self._tx() as db:
            n = db.execute(f"{sql} WHERE id=? AND status='sending' AND lease_owner=?",
                           (*args, delivery_id, owner)).rowcount
        return n == 1

    def renew(self, delivery_id: int, *, owner: str, lease_s: float | None = None) -> bool:
        """Extend ``owner``'s lease (a long send in progress)."""
        until = self._clock() + (self.lease_s if lease_s is None else lease_s)
        return self._owned("UPDATE deliveries SET lease_until=?", (until,), delivery_id, owner)

    def mark_delivered(self, delivery_id: int, *, owner: str, status: int, response: dict[str, Any] | None) -> bool:
        now = self._clock()
        return self._owned(
            "UPDATE deliveries SET status='delivered', delivered_at=?, updated_at=?, lease_until=NULL, "
            "last_status=?, last_error=NULL, response=?",
            (now, now, status, json.dumps(response) if response is not None else None), delivery_id, owner)

    def mark_retry(self, delivery_id: int, *, owner: str, delay_s: float, error: str, status: int | None,
                   count_attempt: bool = True) -> bool:
        """Back to pending, due in ``delay_s``; without ``count_attempt`` the attempt is given back."""
        now = self._clock()
        return self._owned(
            "UPDATE deliveries SET status='pending', next_attempt_at=?, updated_at=?, lease_until=NULL, "
            "last_status=?, last_error=?, attempts=attempts-?",
            (now + delay_s, now, status, error[:2000], 0 if count_attempt else 1), delivery_id, owner)

    def mark_dead(self, delivery_id: int, *, owner: str, error: str, status: int | None,
                  outcome: dict[str, Any] | None) -> bool:
        now = self._clock()
        return self._owned(
            "UPDATE deliveries SET status='dead', updated_at=?, lease_until=NULL, last_status=?, "
            "last_error=?, operation_outcome=?",
            (now, status, error[:2000], json.dumps(outcome) if outcome else None), delivery_id, owner)


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the outbox lock (rolls back on error)."""

    def __init__(self, outbox: Outbox) -> None:
        self._o = outbox

    def __enter__(self) -> sqlite3.Connection:
        self._o._lock.acquire()
        try:
            self._o._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._o._lock.release()
            raise
        return self._o._db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self._o._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._o._lock.release()


def backoff_delay(attempts: int, settings: OutboxSettings, retry_after_s: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Exponential back-off with jitter (half fixed, half random); ``Retry-After`` is a floor."""
    base = min(settings.backoff_max_s, settings.backoff_initial_s * 2 ** max(0, attempts - 1))
    delay = base / 2 + (rng or random).uniform(0, base / 2)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, settings.backoff_max_s))
    return delay


class OutboxSender:
    """Drains an :class:`Outbox` into an :class:`EhrClient`, one Bundle at a time.

    When the endpoint itself is unusable (:class:`EhrEndpointError`: ``/metadata`` refused, not
    FHIR R4) the claimed Bundle is put back without counting the attempt, the sender pauses with
    back-off, and :meth:`drain` raises the error.
    """

    def __init__(self, outbox: Outbox, client: EhrClient, settings: OutboxSettings, *,
                 owner: str | None = None, rng: random.Random | None = None) -> None:
        self.outbox = outbox
        self.client = client
        self.settings = settings
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The last endpoint-level failure (None once a Bundle went through again).
        self.endpoint_error: EhrEndpointError | None = None
        self._endpoint_failures = 0
        self._paused_until = 0.0

    @contextlib.contextmanager
    def _lease_kept(self, d: Delivery) -> Iterator[None]:
        """Renew the lease on ``d`` every ``lease_s / 3`` while the body runs."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.settings.lease_s / 3):
                try:
                    kept = self.outbox.renew(d.id, owner=self.owner, lease_s=self.settings.lease_s)
                except Exception:  # e.g. database locked: try again next time, do not give the lease up
                    log.exception("delivery %s: renewing the lease failed", d.id)
                    continue
                if not kept:
                    log.warning("delivery %s: lease lost to another sender while sending", d.id)
                    return

        t = threading.Thread(target=renew, name=f"leuk-fhir-lease-{d.id}", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def send_one(self) -> Delivery | None:
        """Claim one due delivery and try to send it; returns its new state (None: nothing due)."""
        d = self.outbox.claim(self.owner, self.settings.lease_s)
        if d is None:
            return None
        assert d.bundle is not None
        kept = True
        try:
            with self._lease_kept(d):
                result = self.client.post_transaction(d.bundle)
        except EhrEndpointError as exc:
            self.endpoint_error = exc
            self._endpoint_failures += 1
            delay = backoff_delay(self._endpoint_failures, self.settings, exc.retry_after_s, self._rng)
            self._paused_until = time.monotonic() + delay
            log.warning("EHR endpoint unusable, delivery %s put back (attempt not counted), pausing %.1f s: %s",
                        d.id, delay, exc)
            kept = self.outbox.mark_retry(d.id, owner=self.owner, delay_s=delay, error=f"not sent: {exc}",
                                          status=exc.status, count_attempt=False)
        except DeliveryError as exc:
            status = getattr(exc, "status", None)
            outcome = getattr(exc, "outcome", None)
            if not exc.retryable:
                log.warning("delivery %s (%s) rejected, moved to dead letters: %s", d.id, d.key, exc)
                kept = self.outbox.mark_dead(d.id, owner=self.owner, error=str(exc), status=status, outcome=outcome)
            elif d.attempts >= self.settings.max_attempts:
                log.warning("delivery %s (%s) gave up after %d attempts: %s", d.id, d.key, d.attempts, exc)
                kept = self.outbox.mark_dead(d.id, owner=self.owner, error=f"gave up after {d.attempts} attempts: {exc}",
                                             status=status, outcome=outcome)
            else:
                delay = backoff_delay(d.attempts, self.settings, getattr(exc, "retry_after_s", None), self._rng)
                log.info("delivery %s (%s) attempt %d failed, retrying in %.1f s: %s",
                         d.id, d.key, d.attempts, delay, exc)
                kept = self.outbox.mark_retry(d.id, owner=self.owner, delay_s=delay, error=str(exc), status=status)
        except Exception as exc:  # a bug must not lose the Bundle, nor resend it for ever
            if d.attempts == 1:
                log.exception("unexpected error sending delivery %s", d.id)
            error = f"internal error: {exc!r}"
            if d.attempts >= self.settings.max_attempts:
                log.error("delivery %s (%s) gave up after %d attempts: %s", d.id, d.key, d.attempts, error)
                kept = self.outbox.mark_dead(d.id, owner=self.owner, error=f"gave up after {d.attempts} attempts: "
                                             f"{error}", status=None, outcome=None)
            else:
                log.error("delivery %s attempt %d: %s", d.id, d.attempts, error)
                kept = self.outbox.mark_retry(d.id, owner=self.owner, error=error, status=None,
                                              delay_s=backoff_delay(d.attempts, self.settings, rng=self._rng))
        else:
            self.endpoint_error, self._endpoint_failures = None, 0
            entries = [{"status": s, "location": loc} for s, loc in zip(result.entry_statuses, result.locations, strict=False)]
            kept = self.outbox.mark_delivered(d.id, owner=self.owner, status=result.status,
                                              response={"entries": entries})
            log.info("delivery %s (%s) delivered (%d created)", d.id, d.key, result.created)
        if not kept:
            log.warning("delivery %s: the lease passed to another sender; this outcome was not recorded", d.id)
        return self.outbox.get(d.id)

    def run_once(self, max_items: int | None = None) -> int:
        """Send every delivery that is due now (at most ``max_items``); returns how many were tried.
        Sends nothing while paused after an endpoint failure."""
        n = 0
        while (max_items is None or n < max_items) and not self._stop.is_set():
            if time.monotonic() < self._paused_until or self.send_one() is None:
                break
            n += 1
        return n

    def drain(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Send until nothing can be sent any more (waiting out back-offs), or ``timeout_s`` passes.

        Deliveries waiting for a dependency that will never be delivered do not keep it going
        (``stats()["blocked"]``). Raises :class:`EhrEndpointError` when the endpoint is unusable.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.endpoint_error, self._paused_until = None, 0.0
        while not self._stop.is_set():
            self.run_once()
            if self.endpoint_error is not None:
                raise self.endpoint_error
            wait = self.outbox.next_due_in()
            if wait is None:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            time.sleep(min(max(wait, 0.01), self.settings.poll_interval_s))
        return self.outbox.stats()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep the thread alive (e.g. database locked for too long)
                log.exception("outbox sender loop error")
            self._stop.wait(self.settings.poll_interval_s)

    def start(self) -> None:
        """Run the sender in a background daemon thread."""
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="leuk-fhir-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the background thread (a send in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
