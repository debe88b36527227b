"""The durable outbox and its sender: states, leases, back-off, dead letters (no HAPI needed).

Failures come from a real HTTP exchange with the loopback fault injector
(:class:`FaultProxy` without upstream) or from a port where nothing listens.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import pytest

from leuk_fhir.delivery import (
    DeliveryStatus,
    EhrClient,
    EhrUnavailableError,
    Outbox,
    OutboxSender,
    backoff_delay,
)
from leuk_fhir.delivery.client import EhrEndpointError, EhrRedirectError, parse_retry_after
from leuk_fhir.errors import ConfigurationError, InputError, NotFoundError
from leuk_fhir.settings import OutboxSettings

from .fhir_testservers import (  # type: ignore[import-not-found]
    Fault,
    FaultProxy,
    free_port,
    transaction_response,
)

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
        assert ob.mark_delivered(report, owner="s", status=200, response=None)
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


OUTCOME = {"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "forbidden", "diagnostics": "scope system/Patient.c missing"}]}


# ---------------------------------------------------------------- D1: redirects


@pytest.mark.parametrize("status", [301, 307, 308])
def test_redirects_are_never_followed(proxy, status):
    elsewhere = FaultProxy(None).start()
    try:
        elsewhere.inject(Fault("json", 200, body=transaction_response(0)))
        proxy.inject(Fault("redirect", status, location=elsewhere.base_url))
        with pytest.raises(EhrRedirectError, match=f"HTTP {status}.*{elsewhere.base_url}") as err:
            EhrClient(proxy.base_url).post_transaction(BUNDLE)
        assert "fhir.base_url" in str(err.value) and err.value.location == elsewhere.base_url
        assert elsewhere.log.authorizations == [], "nothing may reach the other host"
    finally:
        elsewhere.stop()


def test_a_permanent_redirect_is_a_dead_letter_naming_the_location(tmp_path, proxy):
    with Outbox(tmp_path / "o.sqlite") as ob:
        ob.enqueue("k", BUNDLE)
        proxy.inject(Fault("redirect", 308, location="http://127.0.0.1:9/other"), Fault("redirect", 307))
        sender = sender_for(ob, proxy.base_url)
        d = sender.send_one()
        assert d is not None and d.status is DeliveryStatus.DEAD and d.last_status == 308
        assert "http://127.0.0.1:9/other" in (d.last_error or "") and "update fhir.base_url" in (d.last_error or "")
        ob.retry(d.id)
        d = sender.send_one()
        assert d is not None and d.status is DeliveryStatus.PENDING and d.last_status == 307


# ---------------------------------------------------------------- D2: malformed answers


@pytest.mark.parametrize("entry", [None, [1, 2], ["x"], [{"response": "201 Created"}], [{"response": {"status": 201}}],
                                   [{"response": None}]])
def test_malformed_transaction_response_is_a_typed_error(proxy, entry):
    proxy.inject(Fault("json", 200, body={"resourceType": "Bundle", "type": "transaction-response", "entry": entry}))
    with pytest.raises(EhrUnavailableError, match="malformed transaction-response"):
        EhrClient(proxy.base_url).post_transaction(BUNDLE)


def test_malformed_capability_statement_is_a_typed_error(proxy):
    proxy.routes["/metadata"] = (200, {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
                                       "rest": [1, {"interaction": "x", "resource": [None]}], "software": "x"})
    assert EhrClient(proxy.base_url).capabilities().fhir_version == "4.0.1"


class BrokenClient(EhrClient):
    """A client with a bug: an unexpected exception cannot be provoked over HTTP any more."""

    def post_transaction(self, bundle):
        raise RuntimeError("bug in the client")


def test_internal_errors_respect_max_attempts(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as ob:
        did = ob.enqueue("k", BUNDLE)
        settings = OutboxSettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02, poll_interval_s=0.01)
        OutboxSender(ob, BrokenClient("http://127.0.0.1:9/fhir"), settings).drain(timeout_s=10)
        d = ob.get(did)
        assert d.status is DeliveryStatus.DEAD and d.attempts == 3
        assert "gave up after 3 attempts: internal error" in (d.last_error or "") and "bug" in (d.last_error or "")


# ---------------------------------------------------------------- D3: deadline and lease


def test_total_deadline_bounds_an_answer_dripped_byte_by_byte(proxy):
    proxy.inject(Fault("drip", 200, body=transaction_response(0), delay_s=0.05))  # ~9 s in all
    t0 = time.monotonic()
    with pytest.raises(EhrUnavailableError, match="no complete answer within 1 s"):
        EhrClient(proxy.base_url, timeout_s=1).post_transaction(BUNDLE)
    assert time.monotonic() - t0 < 3


def test_only_the_lease_owner_records_the_outcome(tmp_path):
    clock = Clock()
    with Outbox(tmp_path / "o.sqlite", lease_s=30, clock=clock) as ob:
        did = ob.enqueue("k", BUNDLE)
        assert ob.claim("a") is not None
        clock.t += 31  # a is stuck; its lease expires and b takes over
        assert ob.claim("b") is not None
        assert not ob.renew(did, owner="a")
        assert not ob.mark_delivered(did, owner="a", status=200, response=None)
        assert not ob.mark_retry(did, owner="a", delay_s=0, error="late", status=500)
        assert not ob.mark_dead(did, owner="a", error="late", status=400, outcome=None)
        d = ob.get(did)
        assert d.status is DeliveryStatus.SENDING and d.last_error is None
        assert ob.mark_delivered(did, owner="b", status=200, response=None)
        assert ob.get(did).status is DeliveryStatus.DELIVERED


def test_the_lease_is_renewed_while_a_slow_send_is_in_flight(tmp_path, proxy):
    with Outbox(tmp_path / "o.sqlite") as ob:
        did = ob.enqueue("k", BUNDLE)
        proxy.inject(Fault("json", 200, body=transaction_response(0), delay_s=2.0))
        settings = OutboxSettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05, lease_s=0.6)
        sender = OutboxSender(ob, EhrClient(proxy.base_url, timeout_s=5), settings)
        worker = threading.Thread(target=sender.send_one)
        worker.start()
        time.sleep(1.3)  # two leases later: the send is still in flight
        assert ob.claim("intruder", 0.6) is None
        worker.join()
        assert ob.get(did).status is DeliveryStatus.DELIVERED and proxy.log.transactions == 1


# ---------------------------------------------------------------- D5: dependencies on dead letters


def test_a_dependant_of_a_dead_letter_dies_with_it_and_comes_back_with_it(tmp_path, proxy):
    with Outbox(tmp_path / "o.sqlite") as ob:
        report = ob.enqueue("r/report", BUNDLE)
        alert = ob.enqueue("r/communication", BUNDLE, "communication", depends_on="r/report")
        proxy.inject(Fault("status", 422))
        t0 = time.monotonic()
        stats = sender_for(ob, proxy.base_url).drain(timeout_s=20)
        assert time.monotonic() - t0 < 5
        assert stats["dead"] == 2 and stats["pending"] == 0
        d = ob.get(alert)
        assert d.status is DeliveryStatus.DEAD and d.attempts == 0
        assert f"depends on dead letter {report} (r/report)" in (d.last_error or "")
        ob.retry(report)
        assert ob.get(alert).status is DeliveryStatus.PENDING


def test_drain_stops_when_only_blocked_deliveries_remain(tmp_path, proxy):
    with Outbox(tmp_path / "o.sqlite") as ob:
        orphan = ob.enqueue("x/sign-off", BUNDLE, "sign-off", depends_on="x/report")  # never enqueued
        t0 = time.monotonic()
        stats = sender_for(ob, proxy.base_url).drain(timeout_s=20)
        assert time.monotonic() - t0 < 2, "drain must not spin until its timeout"
        assert stats["pending"] == 1 and stats["blocked"] == 1
        assert [d.id for d in ob.blocked()] == [orphan] and ob.next_due_in() is None


# ---------------------------------------------------------------- D6: endpoint-level failures


@pytest.mark.parametrize("metadata", [
    (404, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}),
    (200, {"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0"}),
])
def test_an_unusable_endpoint_uses_no_attempts(tmp_path, proxy, metadata):
    with Outbox(tmp_path / "o.sqlite") as ob:
        ids = [ob.enqueue(f"k{i}", BUNDLE) for i in range(3)]
        proxy.routes["/metadata"] = metadata
        sender = sender_for(ob, proxy.base_url, max_attempts=1)
        with pytest.raises(EhrEndpointError, match="fhir.base_url"):
            sender.drain(timeout_s=10)
        ds = [ob.get(did) for did in ids]
        assert all(d.status is DeliveryStatus.PENDING and d.attempts == 0 for d in ds)
        assert "not sent" in (ds[0].last_error or ""), "the one claimed says why"
        assert proxy.log.transactions == 0
        assert sender.run_once() == 0, "the sender pauses"
        del proxy.routes["/metadata"]  # the endpoint is fixed
        proxy.inject(*[Fault("json", 200, body=transaction_response(0))] * 3)
        sender.client._capabilities = None
        assert sender.drain(timeout_s=10)["delivered"] == 3


# ---------------------------------------------------------------- D7, D8, D9


def test_an_oversized_answer_is_refused(proxy):
    proxy.inject(Fault("json", 200, body={"resourceType": "Bundle", "pad": "x" * 20_000}))
    with pytest.raises(EhrUnavailableError, match="exceeds 4096 bytes"):
        EhrClient(proxy.base_url, max_response_bytes=4096).post_transaction(BUNDLE)


def test_credentials_in_the_base_url_are_refused_and_not_shown():
    with pytest.raises(ConfigurationError, match="credentials") as err:
        EhrClient("https://svc:P4ssw0rd@ehr.example.org/fhir")
    assert "P4ssw0rd" not in str(err.value) and "fhir.username" in str(err.value)


@pytest.mark.parametrize("faults,status", [([Fault("status", 403, outcome=OUTCOME)], 403),
                                           ([Fault("status", 401, outcome=OUTCOME)] * 2, 401)])
def test_auth_dead_letters_keep_status_and_operation_outcome(tmp_path, proxy, faults, status):
    with Outbox(tmp_path / "o.sqlite") as ob:
        ob.enqueue("k", BUNDLE)
        proxy.inject(*faults)
        d = sender_for(ob, proxy.base_url, max_attempts=1).send_one()
        assert d is not None and d.status is DeliveryStatus.DEAD
        assert d.last_status == status and d.operation_outcome == OUTCOME and "scope" in (d.last_error or "")


def test_a_failing_entry_is_named_with_its_outcome(tmp_path, proxy):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}}]}
    answer = transaction_response(2)
    answer["entry"][1]["response"] = {"status": "422 Unprocessable Entity", "outcome": OUTCOME}
    with Outbox(tmp_path / "o.sqlite") as ob:
        ob.enqueue("k", bundle)
        proxy.inject(Fault("json", 200, body=answer))
        d = sender_for(ob, proxy.base_url, max_attempts=1).send_one()
        assert d is not None and d.status is DeliveryStatus.DEAD and d.operation_outcome == OUTCOME
        assert "entry 1 (Observation) answered 422" in (d.last_error or "") and "scope" in (d.last_error or "")


def test_outbox_without_create_refuses_a_missing_file(tmp_path):
    with pytest.raises(NotFoundError, match="no outbox"):
        Outbox(tmp_path / "sub" / "typo.sqlite", create=False)
    assert not (tmp_path / "sub").exists()


# ---------------------------------------------------------------- review of the watchdog and the outbox


def _pooled_connections(client: EhrClient) -> list:
    pools = client.session.get_adapter(client.base_url).poolmanager.pools
    keys = pools.keys()  # noqa: SIM118 - the pool container refuses iteration
    return [c for key in keys for c in list(pools[key].pool.queue) if c is not None]


def test_the_watchdog_never_cuts_a_connection_handed_back_to_the_pool(proxy):
    """A connection used under a deadline (e.g. by the SMART token request inside a send) goes
    back to the pool when its answer is read; another request may take it. The deadline firing
    later must not shut that other request's socket down."""
    from leuk_fhir.delivery.client import _deadline

    client = EhrClient(proxy.base_url, timeout_s=5)
    client.capabilities()  # one pooled connection
    proxy.inject(Fault("json", 200, body=transaction_response(0), delay_s=1.0))
    outcome: list[object] = []
    with _deadline(0.3):
        client.session.get(f"{proxy.base_url}/metadata").close()  # done; its connection is back in the pool
        other = threading.Thread(target=lambda: outcome.append(_try(client.post_transaction, BUNDLE)))
        other.start()  # reuses that connection, and waits 1 s for its answer
        time.sleep(0.8)  # the deadline fires while the other request is in flight
    other.join()
    assert outcome and not isinstance(outcome[0], Exception), outcome


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


def test_a_complete_answer_is_not_a_timeout_when_the_watchdog_fires_late(proxy, monkeypatch):
    """The whole answer was read in time; the watchdog firing before the request's bookkeeping
    ended (a busy machine) must not turn the delivered Bundle into a timeout."""
    import requests

    close = requests.Response.close

    def slow_close(self):
        time.sleep(0.6)
        close(self)

    client = EhrClient(proxy.base_url, timeout_s=5)
    client.capabilities()
    client.total_timeout_s = 0.3
    proxy.inject(Fault("json", 200, body=transaction_response(0)))
    monkeypatch.setattr(requests.Response, "close", slow_close)
    assert client.post_transaction(BUNDLE).status == 200
    monkeypatch.undo()
    assert [c for c in _pooled_connections(client) if c.sock is not None and not c.is_connected] == [], \
        "a half-closed socket went back to the pool"


def test_an_aborted_connection_does_not_go_back_to_the_pool_half_closed(proxy):
    """A close-delimited answer cut by the watchdog just ends: still a timeout, and its
    connection is not pooled with a shut-down socket."""
    proxy.inject(Fault("drip", 200, body=transaction_response(0), delay_s=0.1, content_length=False))
    client = EhrClient(proxy.base_url, timeout_s=5)
    client.capabilities()
    client.total_timeout_s = 0.5
    with pytest.raises(EhrUnavailableError, match="no complete answer"):
        client.post_transaction(BUNDLE)
    assert [c for c in _pooled_connections(client) if c.sock is not None] == []


def test_one_watchdog_thread_serves_concurrent_requests(proxy):
    client = EhrClient(proxy.base_url, timeout_s=5)
    client.capabilities()
    proxy.inject(*[Fault("json", 200, body=transaction_response(0), delay_s=0.8) for _ in range(8)])
    workers = [threading.Thread(target=client.post_transaction, args=(BUNDLE,)) for _ in range(8)]
    for w in workers:
        w.start()
    time.sleep(0.4)
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer)]
    watchdogs = [t for t in threading.enumerate() if t.name == "leuk-fhir-watchdog"]
    for w in workers:
        w.join()
    assert timers == [] and len(watchdogs) == 1


def test_retry_brings_back_dependants_of_dependants(tmp_path):
    clock = Clock()
    with Outbox(tmp_path / "o.sqlite", clock=clock) as ob:
        report = ob.enqueue("r/report", BUNDLE)
        alert = ob.enqueue("r/alert", BUNDLE, depends_on="r/report")
        ack = ob.enqueue("r/ack", BUNDLE, depends_on="r/alert")
        assert ob.claim("a") is not None
        assert ob.mark_dead(report, owner="a", error="422", status=422, outcome=None)
        assert ob.claim("a") is None  # buries alert, then ack
        assert {ob.get(i).status for i in (alert, ack)} == {DeliveryStatus.DEAD}
        ob.retry(report)
        assert [ob.get(i).status for i in (report, alert, ack)] == [DeliveryStatus.PENDING] * 3


def _vm_steps(ob: Outbox, fn) -> int:
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    ob._db.set_progress_handler(count, 10)
    try:
        fn()
    finally:
        ob._db.set_progress_handler(None, 10)
    return steps[0]


def test_claim_cost_does_not_grow_with_the_dead_letters(tmp_path):
    """Every claim looks for dependants of dead letters; that must not read every dead letter."""
    clock = Clock()
    with Outbox(tmp_path / "o.sqlite", clock=clock) as ob:
        ob.enqueue("alone", BUNDLE)
        small = _vm_steps(ob, lambda: ob.claim("a", 60))
        with ob._tx() as db:
            db.executemany("INSERT INTO deliveries (key, kind, bundle, status, next_attempt_at, created_at, "
                           "updated_at) VALUES (?, 'report', '{}', 'dead', 0, 0, 0)",
                           [(f"dead/{i}",) for i in range(20_000)])
        ob.enqueue("second", BUNDLE)
        large = _vm_steps(ob, lambda: ob.claim("a", 60))
        assert large < small * 3, (small, large)


def test_a_redirected_metadata_request_uses_no_attempts(tmp_path, proxy):
    proxy.routes["/metadata"] = (302, {})
    with Outbox(tmp_path / "o.sqlite") as ob:
        did = ob.enqueue("k", BUNDLE)
        sender = sender_for(ob, proxy.base_url, max_attempts=2)
        for _ in range(3):
            with pytest.raises(EhrEndpointError):
                sender.drain(timeout_s=5)
        d = ob.get(did)
        assert d.status is DeliveryStatus.PENDING and d.attempts == 0


def test_a_failing_renewal_does_not_end_the_renewals(tmp_path, proxy, monkeypatch):
    with Outbox(tmp_path / "o.sqlite") as ob:
        did = ob.enqueue("k", BUNDLE)
        proxy.inject(Fault("json", 200, body=transaction_response(0), delay_s=2.0))
        settings = OutboxSettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05, lease_s=0.6)
        sender = OutboxSender(ob, EhrClient(proxy.base_url, timeout_s=5), settings)
        renew, failed = ob.renew, []

        def flaky_renew(*args, **kw):
            if not failed:
                failed.append(1)
                raise sqlite3.OperationalError("database is locked")
            return renew(*args, **kw)

        monkeypatch.setattr(ob, "renew", flaky_renew)
        worker = threading.Thread(target=sender.send_one)
        worker.start()
        time.sleep(1.3)
        assert ob.claim("intruder", 0.6) is None
        worker.join()
        assert ob.get(did).status is DeliveryStatus.DELIVERED and proxy.log.transactions == 1
