"""The EHR client: one HTTP session, the server's CapabilityStatement, transactions.

Every failure becomes a :class:`~leuk_fhir.errors.DeliveryError`; ``retryable`` says whether
sending again later may succeed (connection errors, timeouts, 408, 429, 5xx, unreadable
answers) or not (other 4xx: the answer's OperationOutcome is kept for the dead letter).

Requests only ever go to ``base_url``: redirects are never followed (a 3xx is an
:class:`EhrRedirectError`). Each request, its answer included, must finish within
``total_timeout_s`` (a watchdog shuts its sockets down otherwise), and answers larger than
``max_response_bytes`` are refused.
"""

from __future__ import annotations

import contextlib
import email.utils
import heapq
import ipaddress
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import Timeout

from leuk_fhir.delivery.auth import EhrAuth, NoAuth, auth_from_settings
from leuk_fhir.errors import (
    AuthenticationError,
    ConfigurationError,
    DeliveryError,
    PermanentDeliveryError,
)
from leuk_fhir.http_body import BodyTooLargeError, read_body
from leuk_fhir.settings import FhirSettings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUS = {408, 425, 429}
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class EhrUnavailableError(DeliveryError):
    """The EHR could not take the request now (network, timeout, 429, 5xx, garbled answer)."""

    code = "delivery-unavailable"

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None,
                 outcome: dict[str, Any] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.retry_after_s = retry_after_s
        self.outcome = outcome


class EhrRejectedError(PermanentDeliveryError):
    """The EHR refused the request for a reason that resending the same Bundle cannot fix."""

    def __init__(self, message: str, *, status: int | None = None,
                 outcome: dict[str, Any] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.outcome = outcome


class EhrEndpointError(EhrUnavailableError):
    """``fhir.base_url`` is not a usable FHIR R4 endpoint (``/metadata`` refused, wrong version).

    It says nothing about any one Bundle: the outbox pauses instead of using up attempts.
    """

    code = "delivery-endpoint"


class EhrRedirectError(DeliveryError):
    """The EHR answered 3xx; requests are never sent on to another URL."""

    code = "delivery-redirected"

    def __init__(self, message: str, *, status: int, location: str | None) -> None:
        super().__init__(message, hint="update fhir.base_url")
        self.status = status
        self.location = location
        self.outcome: dict[str, Any] | None = None
        #: A permanent move (301, 308) will not go away by itself.
        self.retryable = status not in (301, 308)


class EhrAuthRejectedError(AuthenticationError):
    """The EHR refused the credentials (401 after a fresh token, or 403); keeps its answer."""

    def __init__(self, message: str, *, status: int, outcome: dict[str, Any] | None) -> None:
        super().__init__(message, hint="check the fhir.auth settings and the client's permissions")
        self.status = status
        self.outcome = outcome


@dataclass(frozen=True)
class Capabilities:
    """What the server's CapabilityStatement (``GET [base]/metadata``) says."""

    fhir_version: str
    software: str
    system_interactions: frozenset[str]
    resource_types: frozenset[str]


@dataclass(frozen=True)
class TransactionResult:
    """A successful transaction: HTTP status, the response Bundle, per-entry outcomes."""

    status: int
    bundle: dict[str, Any]
    entry_statuses: tuple[str, ...] = field(default_factory=tuple)
    locations: tuple[str, ...] = field(default_factory=tuple)

    @property
    def created(self) -> int:
        """Entries the server created (201) rather than matched or updated."""
        return sum(1 for s in self.entry_statuses if s.startswith("201"))


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _outcome_text(outcome: Any) -> str:
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    issues = outcome.get("issue")
    texts = [
        f"{i.get('severity', '?')}: {i.get('diagnostics') or _dict(i.get('details')).get('text', '')}"
        for i in (issues if isinstance(issues, list) else []) if isinstance(i, dict)
    ]
    return "; ".join(t for t in texts if t.strip(": "))[:1000]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _check_base_url(base_url: str) -> None:
    """Refuse anything but an http(s) URL without credentials in it (they would leak into logs)."""
    parts = urlsplit(base_url or "")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError("fhir.base_url must not contain credentials (user:password@)",
                                 hint="use fhir.auth with fhir.username / fhir.password or a token")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(f"fhir.base_url {base_url!r} is not an http(s) URL")


_warned_plain_http: set[str] = set()
_warned_lock = threading.Lock()


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_plain_http(base_url: str) -> None:
    """Log once per process and base URL when reports would travel unencrypted to another
    machine (plain http:// to a host that is not this one)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or _loopback(parts.hostname or ""):
        return
    with _warned_lock:
        if base_url in _warned_plain_http:
            return
        _warned_plain_http.add(base_url)
    log.warning(
        "fhir.base_url %s is plain http:// to another host: reports (patient data) and "
        "credentials travel unencrypted; use https:// outside a closed test network", base_url
    )


# ---------------------------------------------------------------------- total deadline
#
# One watchdog thread serves every request (not one timer thread per request). A request's
# _Deadline holds the connections it has checked out of the pool right now: a connection joins
# when a request is sent on it from the deadline's thread (the SMART token request inside a
# send included) and leaves when it goes back to the pool, so a deadline that fires late never
# touches a connection another request took since. A connection that was cut goes back closed,
# never half-closed. Once the answer is read whole the deadline is finished and cannot fire.


class _Deadline:
    """One request's deadline (see above); ``fired`` says whether it cut the request."""

    def __init__(self, when: float) -> None:
        self.when = when
        self.fired = threading.Event()
        self.done = False
        self._lock = threading.Lock()
        self._conns: set[HTTPConnection] = set()

    def add(self, conn: HTTPConnection) -> None:
        with self._lock:
            if self.done:
                return
            conn._leuk_deadline = self  # type: ignore[attr-defined]
            self._conns.add(conn)
            if self.fired.is_set():  # a request started after the deadline: cut it at once
                _cut(conn)

    def release(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._conns.discard(conn)
            conn._leuk_deadline = None  # type: ignore[attr-defined]

    def finish(self) -> None:
        """The request is over (answer read, or failed): the deadline cannot fire any more."""
        with self._lock:
            self.done = True
            for conn in self._conns:
                conn._leuk_deadline = None  # type: ignore[attr-defined]
            self._conns.clear()

    def fire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.fired.set()
            for conn in self._conns:
                _cut(conn)


def _cut(conn: HTTPConnection) -> None:
    """Shut the socket down (the reading thread gets EOF at once); it is closed on release."""
    conn._leuk_aborted = True  # type: ignore[attr-defined]
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not SSLSocket's: no TLS state touched


class _Watchdog:
    """A single daemon thread firing due deadlines."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._compact_at = 1024

    def schedule(self, deadline: _Deadline) -> None:
        with self._cv:
            if len(self._heap) >= self._compact_at:  # finished deadlines wait for their time otherwise
                self._heap = [e for e in self._heap if not e[2].done]
                heapq.heapify(self._heap)
                self._compact_at = max(1024, 2 * len(self._heap))
            heapq.heappush(self._heap, (deadline.when, next(self._seq), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="leuk-fhir-watchdog", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cv.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        due = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(wait)
            due.fire()


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):  # a forked child has no watchdog thread (and maybe a held lock)
    os.register_at_fork(after_in_child=_WATCHDOG._reset)

_inflight = threading.local()  # this thread's current _Deadline


def _track(conn: HTTPConnection) -> None:
    deadline = getattr(_inflight, "deadline", None)
    if deadline is not None:
        deadline.add(conn)


def _untrack(conn: Any) -> None:
    """``conn`` goes back to the pool: out of its deadline, and closed if the deadline cut it."""
    if conn is None:
        return
    deadline = getattr(conn, "_leuk_deadline", None)
    if deadline is not None:
        deadline.release(conn)
    if getattr(conn, "_leuk_aborted", False):
        conn._leuk_aborted = False  # type: ignore[attr-defined]
        conn.close()


class _TrackedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _track(self)
        super().request(*args, **kwargs)


class _TrackedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _track(self)
        super().request(*args, **kwargs)


class _TrackedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection

    def _put_conn(self, conn: Any) -> None:
        _untrack(conn)
        super()._put_conn(conn)


class _TrackedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection

    def _put_conn(self, conn: Any) -> None:
        _untrack(conn)
        super()._put_conn(conn)


class _DeadlineAdapter(HTTPAdapter):
    """An adapter whose connections can be aborted by :func:`_deadline`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[_Deadline]:
    """After ``seconds`` the watchdog shuts down the sockets this thread's request holds (token
    requests included), so a server that drips its answer cannot hold us. Call ``finish()`` on
    the yielded deadline once the answer is read, before the connection goes back to the pool;
    its ``fired`` says whether it cut the request."""
    deadline = _Deadline(time.monotonic() + seconds)
    outer = getattr(_inflight, "deadline", None)
    _inflight.deadline = deadline
    _WATCHDOG.schedule(deadline)
    try:
        yield deadline
    finally:
        deadline.finish()
        _inflight.deadline = outer


class EhrClient:
    """A FHIR R4 server seen from leuk-fhir (see module docstring)."""

    def __init__(
        self,
        base_url: str,
        auth: EhrAuth | None = None,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float | None = None,
        verify: bool | str = True,
        session: requests.Session | None = None,
        total_timeout_s: float | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        _check_base_url(base_url)
        _warn_plain_http(base_url)
        self.base_url = base_url.rstrip("/")
        self.auth = auth or NoAuth()
        self.timeout = (connect_timeout_s or min(10.0, timeout_s), timeout_s)
        #: Limit on one whole request, answer included (``timeout`` bounds each read only).
        self.total_timeout_s = total_timeout_s or timeout_s
        self.max_response_bytes = max_response_bytes
        self.verify = verify
        self.session = session or requests.Session()
        adapter = _DeadlineAdapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"Accept": FHIR_JSON, "User-Agent": "leuk-fhir"})
        self._capabilities: Capabilities | None = None

    @classmethod
    def from_settings(cls, settings: FhirSettings) -> EhrClient:
        """A client for ``settings.base_url`` with the configured authentication and CA bundle."""
        if not settings.base_url:
            raise ConfigurationError("no EHR configured", hint="set fhir.base_url / LEUK_FHIR_FHIR_BASE_URL")
        _check_base_url(settings.base_url)
        verify: bool | str = True
        if settings.ca_bundle is not None:
            if not settings.ca_bundle.is_file():
                raise ConfigurationError(f"fhir.ca_bundle {settings.ca_bundle} does not exist")
            verify = str(settings.ca_bundle)
        session = requests.Session()
        return cls(settings.base_url, auth_from_settings(settings, session), timeout_s=settings.timeout_s,
                   verify=verify, session=session)

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request; a 401 drops the cached token and is retried once with a fresh one."""
        resp = self._send(method, url, **kwargs)
        if resp.status_code == 401:
            log.info("EHR answered 401; fetching a fresh credential and retrying once")
            self.auth.invalidate()
            resp = self._send(method, url, **kwargs)
        return resp

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One exchange, never redirected, read whole within the total deadline and size cap."""
        limit = self.total_timeout_s
        timeout: Any = Timeout(connect=self.timeout[0], read=self.timeout[1], total=limit)  # requests takes it
        late = f"EHR timed out on {method} {url}: no complete answer within {limit:g} s"
        with _deadline(limit) as deadline:
            try:
                resp = self.session.request(method, url, auth=self.auth, timeout=timeout, verify=self.verify,
                                            allow_redirects=False, stream=True, **kwargs)
                try:
                    body = read_body(resp, self.max_response_bytes)
                except BodyTooLargeError as exc:
                    raise EhrUnavailableError(f"{method} {url}: {exc}", status=resp.status_code) from None
                finally:
                    deadline.finish()  # before close() hands the connection back to the pool
                    resp.close()
            except requests.RequestException as exc:
                if deadline.fired.is_set():
                    raise EhrUnavailableError(late) from exc
                if isinstance(exc, requests.Timeout):
                    raise EhrUnavailableError(f"EHR timed out on {method} {url}: {exc}") from exc
                if isinstance(exc, requests.ConnectionError):
                    raise EhrUnavailableError(f"EHR unreachable at {url}: {exc}") from exc
                raise EhrUnavailableError(f"HTTP error on {method} {url}: {exc}") from exc
        if deadline.fired.is_set():  # cut off: a close-delimited answer just ends early
            raise EhrUnavailableError(late)
        resp._content = body  # the answer, read above; resp.json() / resp.text use it
        return resp

    def _raise_for(self, resp: requests.Response, what: str) -> None:
        status = resp.status_code
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            location = resp.headers.get("Location")
            raise EhrRedirectError(f"{what}: the EHR redirected (HTTP {status}) to {location or '(no Location)'}; "
                                   "nothing was sent there", status=status, location=location)
        outcome = None
        try:
            body = resp.json()
            if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
                outcome = body
        except ValueError:
            pass
        detail = _outcome_text(outcome) or resp.text[:300].replace("\n", " ")
        message = f"{what}: HTTP {status} {resp.reason or ''}: {detail}".strip()
        if status in RETRYABLE_STATUS or status >= 500:
            raise EhrUnavailableError(message, status=status, outcome=outcome,
                                      retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
        if status in (401, 403):
            raise EhrAuthRejectedError(message, status=status, outcome=outcome)
        raise EhrRejectedError(message, status=status, outcome=outcome)

    @staticmethod
    def _json(resp: requests.Response, what: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError as exc:
            kind = resp.headers.get("Content-Type", "?")
            raise EhrUnavailableError(
                f"{what}: HTTP {resp.status_code} but the answer is not JSON ({kind}, "
                f"{len(resp.content)} bytes: {resp.text[:80]!r})", status=resp.status_code,
            ) from exc
        if not isinstance(body, dict) or "resourceType" not in body:
            raise EhrUnavailableError(f"{what}: the answer is not a FHIR resource", status=resp.status_code)
        return body

    # ------------------------------------------------------------------ FHIR

    def capabilities(self) -> Capabilities:
        """Read ``/metadata`` once; refuse servers that are not FHIR R4 or lack transactions."""
        if self._capabilities is None:
            try:
                resp = self._request("GET", f"{self.base_url}/metadata")
                self._raise_for(resp, "GET /metadata")
            except DeliveryError as exc:
                # a redirected /metadata (a login page, a moved base) is the endpoint's fault too
                if isinstance(exc, AuthenticationError) or (exc.retryable and not isinstance(exc, EhrRedirectError)):
                    raise
                raise EhrEndpointError(exc.message, status=getattr(exc, "status", None),
                                       outcome=getattr(exc, "outcome", None),
                                       hint="is fhir.base_url the FHIR R4 base?") from exc
            cs = self._json(resp, "GET /metadata")
            version = str(cs.get("fhirVersion", ""))
            rest = [r for r in _list(cs.get("rest")) if isinstance(r, dict) and r.get("mode", "server") == "server"]
            server = rest[0] if rest else {}
            interactions = frozenset(str(_dict(i).get("code", "")) for i in _list(server.get("interaction")))
            types = frozenset(str(_dict(r).get("type", "")) for r in _list(server.get("resource")))
            soft = _dict(cs.get("software"))
            caps = Capabilities(version, f"{soft.get('name', '?')} {soft.get('version', '')}".strip(),
                                interactions, types)
            if not version.startswith("4.0"):
                raise EhrEndpointError(f"the EHR speaks FHIR {version or '(unknown)'}; leuk-fhir sends R4 (4.0.x)",
                                       hint="is fhir.base_url the FHIR R4 base?")
            if interactions and "transaction" not in interactions:
                raise EhrEndpointError("the EHR's CapabilityStatement does not list the transaction interaction",
                                       hint="is fhir.base_url the FHIR R4 base?")
            self._capabilities = caps
        return self._capabilities

    def post_transaction(self, bundle: dict[str, Any]) -> TransactionResult:
        """POST a transaction Bundle to the base URL; every entry must answer 2xx."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise EhrRejectedError("only transaction Bundles are sent")
        self.capabilities()
        resp = self._request("POST", self.base_url, data=json.dumps(bundle).encode("utf-8"),
                             headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})
        self._raise_for(resp, "POST transaction")
        body = self._json(resp, "POST transaction")
        if body.get("resourceType") != "Bundle" or body.get("type") != "transaction-response":
            raise EhrUnavailableError(
                f"POST transaction answered a {body.get('resourceType')} ({body.get('type')}), "
                "not a transaction-response Bundle", status=resp.status_code)
        entries = body.get("entry", [])  # FHIR leaves out empty lists
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("response"), dict)
                and isinstance(e["response"].get("status"), str) for e in entries):
            raise EhrUnavailableError("POST transaction: malformed transaction-response (every entry needs "
                                      "a response with a status)", status=resp.status_code)
        responses = [e["response"] for e in entries]
        sent = _list(bundle.get("entry"))
        if len(responses) != len(sent):
            raise EhrUnavailableError(f"transaction-response has {len(responses)} entries for {len(sent)} "
                                      "requests", status=resp.status_code)
        for i, r in enumerate(responses):
            if r["status"][:1] != "2":
                rtype = _dict(_dict(sent[i]).get("resource")).get("resourceType", "?")
                outcome = r.get("outcome") if isinstance(r.get("outcome"), dict) else None
                raise EhrUnavailableError(
                    f"transaction-response entry {i} ({rtype}) answered {r['status']}: "
                    f"{_outcome_text(outcome) or 'no OperationOutcome'}", status=resp.status_code, outcome=outcome)
        statuses = tuple(r["status"] for r in responses)
        locations = tuple(str(r.get("location", "")) for r in responses)
        return TransactionResult(resp.status_code, body, statuses, locations)

    def search(self, resource_type: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """A search; returns the searchset Bundle (not cached: ``Cache-Control: no-cache``)."""
        resp = self._request("GET", f"{self.base_url}/{resource_type}", params=params or {},
                             headers={"Cache-Control": "no-cache"})
        self._raise_for(resp, f"GET {resource_type}")
        return self._json(resp, f"GET {resource_type}")

    def read(self, reference: str) -> dict[str, Any]:
        """Read ``Type/id``."""
        resp = self._request("GET", f"{self.base_url}/{reference}")
        self._raise_for(resp, f"GET {reference}")
        return self._json(resp, f"GET {reference}")

    def validate(self, resource: dict[str, Any]) -> dict[str, Any]:
        """``POST [type]/$validate``; returns the OperationOutcome (errors do not raise)."""
        resp = self._request("POST", f"{self.base_url}/{resource['resourceType']}/$validate",
                             data=json.dumps(resource).encode("utf-8"), headers={"Content-Type": FHIR_JSON})
        if resp.status_code >= 500 or resp.status_code in RETRYABLE_STATUS or 300 <= resp.status_code < 400:
            self._raise_for(resp, "$validate")
        return self._json(resp, "$validate")
