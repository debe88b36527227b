"""The durable outbox and its sender: states, leases, back-off, dead letters (no HAPI needed).

Failures come from a real HTTP exchange with the loopback fault injector
(:class:`FaultProxy` without upstream) or from a port where nothing listens.
"""

from __future__ import annotations

import random
import sqlite3

import pytest

from leuk_fhir.delivery import DeliveryStatus, EhrClient, Outbox, OutboxSender, backoff_delay
from leuk_fhir.delivery.client import parse_retry_after
from leuk_fhir.errors import InputError, NotFoundError
from leuk_fhir.settings import OutboxSettings

from .fhir_testservers import Fault, FaultProxy, free_port  # type: ignore[import-not-found]

BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": []}


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_enqueue_is_durable_idempotent_and_wal(tmp_path):
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as ob:
        a = ob.enqueue("r1/report", BUNDLE)
        assert ob.enqueue("r1/report", BUNDLE) == a
        b = ob.enqueue("r2/report", BUNDLE, "report")
        assert a != b
        with pytest.raises(InputError):
            ob.enqueue("x", {"resourceType": "Patient"})
        with pytest.raises(InputError):
            ob.enqueue("", BUNDLE)
    # another connection (a restarted process) sees both, and the journal is WAL
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 2
    with Outbox(path) as ob:
        assert ob.get(a).bundle == BUNDLE
        assert ob.stats()["pending"] == 2
        with pytest.raises(NotFoundError):
            ob.get(999)


def test_lease_expiry_lets_another_sender_resume(tmp_path):
    clock = Clock()
    with Outbox(tmp_path / "o.sqlite", lease_s=30, clock=clock) as ob:
        did = ob.enqueue("k", BUNDLE)
        first = ob.claim("crashed-sender")
        assert first is not None and first.id == did and first.attempts == 1
        assert ob.claim("other") is None  # leased
        clock.t += 31
        again = ob.claim("other")
        assert again is not None and again.id == did and again.attempts == 2


def test_depends_on_waits_for_the_report(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as ob:
        alert = ob.enqueue("r/communication", BUNDLE, "communication", depends_on="r/report")
        report = ob.enqueue("r/report", BUNDLE)
        d = ob.claim("s")
        assert d is not None and d.id == report
        assert ob.claim("s") is None  # the alert waits
        ob.mark_delivered(report, status=200, response=None)
        d2 = ob.claim("s")
        assert d2 is not None and d2.id == alert


def test_backoff_grows_with_jitter_and_honours_retry_after():
    s = OutboxSettings(backoff_initial_s=1, backoff_max_s=60)
    rng = random.Random(1)
    delays = [backoff_delay(n, s, rng=rng) for n in range(1, 9)]
    for n, d in enumerate(delays, start=1):
        base = min(60, 2 ** (n - 1))
        assert base / 2 <= d <= base
    assert backoff_delay(1, s, retry_after_s=30, rng=rng) >= 30
    assert backoff_delay(1, s, retry_after_s=3600, rng=rng) <= 60
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


@pytest.fixture
def proxy():
    p = FaultProxy(None).start()
    yield p
    p.stop()


def sender_for(ob: Outbox, base: str, **kw) -> OutboxSender:
    settings = OutboxSettings(max_attempts=kw.pop("max_attempts", 5), backoff_initial_s=0.01,
                              backoff_max_s=0.05, poll_interval_s=0.01, lease_s=5)
    return OutboxSender(ob, EhrClient(base, timeout_s=kw.pop("timeout_s", 5)), settings)


def test_transient_failures_stay_pending(tmp_path, proxy):
    with Outbox(tmp_path / "o.sqlite") as ob:
        ob.enqueue("k", BUNDLE)
        sender = sender_for(ob, proxy.base_url, max_attempts=6)
        proxy.inject(Fault("status", 500), Fault("html-502"), Fault("html-200"),
                     Fault("status", 429, retry_after="0"), Fault("status", 503))
        errors = []
        for _ in range(5):
            d = sender.send_one()
            while d is None:  # wait out the back-off
                d = sender.send_one()
            assert d.status is DeliveryStatus.PENDING
            errors.append((d.last_status, d.last_error))
        assert [e[0] for e in errors] == [500, 502, 200, 429, 503]
        assert "not JSON" in errors[2][1]
        assert proxy.log.faults_applied == ["status", "html-502", "html-200", "status", "status"]


def test_retry_after_is_honoured(tmp_path, proxy):
    clock = Clock()
    with Outbox(tmp_path / "o.sqlite", clock=clock) as ob:
        did = ob.enqueue("k", BUNDLE)
        proxy.inject(Fault("status", 429, retry_after="40"))
        settings = OutboxSettings(backoff_initial_s=0.01, backoff_max_s=300)
        OutboxSender(ob, EhrClient(proxy.base_url), settings).send_one()
        d = ob.get(did)
        assert d.status is DeliveryStatus.PENDING and d.next_attempt_at - clock.t >= 40


def test_unfixable_4xx_goes_to_dead_letters_with_operation_outcome(tmp_path, proxy):
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "HAPI-0450: Failed to parse"}]}
    with Outbox(tmp_path / "o.sqlite") as ob:
        did = ob.enqueue("k", BUNDLE)
        proxy.inject(Fault("status", 400, outcome=outcome))
        d = sender_for(ob, proxy.base_url).send_one()
        assert d is not None and d.status is DeliveryStatus.DEAD and d.last_status == 400
        assert d.operation_outcome == outcome and "HAPI-0450" in (d.last_error or "")
        assert [x.id for x in ob.list("dead")] == [did]
        again = ob.retry(did)
        assert again.status is DeliveryStatus.PENDING and again.attempts == 0
        assert again.bundle == BUNDLE


def test_unreachable_server_until_attempts_run_out(tmp_path):
    dead_port = free_port()  # nothing listens here
    with Outbox(tmp_path / "o.sqlite") as ob:
        did = ob.enqueue("k", BUNDLE)
        sender = sender_for(ob, f"http://127.0.0.1:{dead_port}/fhir", max_attempts=3)
        stats = sender.drain(timeout_s=10)
        d = ob.get(did)
        assert d.status is DeliveryStatus.DEAD and d.attempts == 3
        assert "gave up after 3 attempts" in (d.last_error or "") and "unreachable" in (d.last_error or "")
        assert stats["dead"] == 1 and stats["pending"] == 0


def test_background_thread_start_stop(tmp_path, proxy):
    with Outbox(tmp_path / "o.sqlite") as ob:
        ob.enqueue("k", BUNDLE)
        proxy.inject(*[Fault("status", 400)])
        sender = sender_for(ob, proxy.base_url)
        sender.start()
        import time

        deadline = time.time() + 10
        while ob.stats()["dead"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        sender.stop()
        assert ob.stats()["dead"] == 1
