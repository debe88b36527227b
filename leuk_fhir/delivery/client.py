"""The EHR client: one HTTP session, the server's CapabilityStatement, transactions.

Every failure becomes a :class:`~leuk_fhir.errors.DeliveryError`; ``retryable`` says whether
sending again later may succeed (connection errors, timeouts, 408, 429, 5xx, unreadable
answers) or not (other 4xx: the answer's OperationOutcome is kept for the dead letter).
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from leuk_fhir.delivery.auth import EhrAuth, NoAuth, auth_from_settings
from leuk_fhir.errors import (
    AuthenticationError,
    ConfigurationError,
    DeliveryError,
    PermanentDeliveryError,
)
from leuk_fhir.settings import FhirSettings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUS = {408, 425, 429}


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


def _outcome_text(outcome: dict[str, Any] | None) -> str:
    if not outcome or outcome.get("resourceType") != "OperationOutcome":
        return ""
    texts = [
        f"{i.get('severity', '?')}: {i.get('diagnostics') or (i.get('details') or {}).get('text', '')}"
        for i in outcome.get("issue", [])
    ]
    return "; ".join(t for t in texts if t.strip(": "))[:1000]


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
    ) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"fhir.base_url {base_url!r} is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.auth = auth or NoAuth()
        self.timeout = (connect_timeout_s or min(10.0, timeout_s), timeout_s)
        self.verify = verify
        self.session = session or requests.Session()
        self.session.headers.update({"Accept": FHIR_JSON, "User-Agent": "leuk-fhir"})
        self._capabilities: Capabilities | None = None

    @classmethod
    def from_settings(cls, settings: FhirSettings) -> EhrClient:
        """A client for ``settings.base_url`` with the configured authentication and CA bundle."""
        if not settings.base_url:
            raise ConfigurationError("no EHR configured", hint="set fhir.base_url / LEUK_FHIR_FHIR_BASE_URL")
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
        for attempt in (1, 2):
            try:
                resp = self.session.request(method, url, auth=self.auth, timeout=self.timeout,
                                            verify=self.verify, **kwargs)
            except requests.Timeout as exc:
                raise EhrUnavailableError(f"EHR timed out on {method} {url}: {exc}") from exc
            except requests.ConnectionError as exc:
                raise EhrUnavailableError(f"EHR unreachable at {url}: {exc}") from exc
            except requests.RequestException as exc:
                raise EhrUnavailableError(f"HTTP error on {method} {url}: {exc}") from exc
            if resp.status_code == 401 and attempt == 1:
                log.info("EHR answered 401; fetching a fresh credential and retrying once")
                self.auth.invalidate()
                continue
            return resp
        raise AuthenticationError(f"EHR refused the credentials on {method} {url} (HTTP 401)")

    def _raise_for(self, resp: requests.Response, what: str) -> None:
        status = resp.status_code
        if 200 <= status < 300:
            return
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
            raise AuthenticationError(message)
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
            resp = self._request("GET", f"{self.base_url}/metadata")
            self._raise_for(resp, "GET /metadata")
            cs = self._json(resp, "GET /metadata")
            version = str(cs.get("fhirVersion", ""))
            rest = [r for r in cs.get("rest", []) if r.get("mode", "server") == "server"] or [{}]
            interactions = frozenset(i.get("code", "") for i in rest[0].get("interaction", []))
            types = frozenset(r.get("type", "") for r in rest[0].get("resource", []))
            soft = cs.get("software") or {}
            caps = Capabilities(version, f"{soft.get('name', '?')} {soft.get('version', '')}".strip(),
                                interactions, types)
            if not version.startswith("4.0"):
                raise EhrRejectedError(f"the EHR speaks FHIR {version or '(unknown)'}; leuk-fhir sends R4 (4.0.x)")
            if interactions and "transaction" not in interactions:
                raise EhrRejectedError("the EHR's CapabilityStatement does not list the transaction interaction")
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
        statuses = tuple(str((e.get("response") or {}).get("status", "")) for e in body.get("entry", []))
        bad = [s for s in statuses if s[:1] != "2"]
        if bad or len(statuses) != len(bundle.get("entry", [])):
            raise EhrUnavailableError(
                f"transaction-response has {len(statuses)} entries for {len(bundle.get('entry', []))} "
                f"requests; non-2xx: {bad}", status=resp.status_code)
        locations = tuple(str((e.get("response") or {}).get("location", "")) for e in body.get("entry", []))
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
        if resp.status_code >= 500 or resp.status_code in RETRYABLE_STATUS:
            self._raise_for(resp, "$validate")
        return self._json(resp, "$validate")
