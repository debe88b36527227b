"""Loopback servers for the delivery tests.

* :class:`FaultProxy` -- a FAULT INJECTOR. It sits in front of the real HAPI FHIR server and
  forwards every request, except that each queued fault is applied once to the next
  transaction (POST to the base URL): HTML error pages, truncated JSON, 5xx, 429 with
  Retry-After, 401, a reply delayed past the client's timeout after HAPI processed the
  request, a dropped connection. HAPI cannot be made to answer these, hence this stand-in.
  It can be stopped and started on the same port to simulate an outage, and can require
  bearer tokens issued by :class:`SmartAuthServer`. Faults that need no upstream answer the
  transaction themselves: a canned JSON answer (``json``: malformed-but-valid JSON, oversized
  bodies, slow answers), a redirect, or an answer dripped one byte at a time (``drip``).
  ``routes`` answers other paths (``/metadata``, ``/token``, SMART discovery) with canned JSON.
* :class:`SmartAuthServer` -- a real OAuth2 token endpoint: authlib's ``AuthorizationServer``
  in a small Flask app (served by werkzeug on loopback) with the client-credentials grant and
  RFC 7523 JWT client assertions checked against the client's registered public JWKS
  (RS384/ES384, as SMART Backend Services require).
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

CAPABILITY_STATEMENT = {  # only used when the proxy has no upstream (client-level fault tests)
    "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "fhirVersion": "4.0.1",
    "format": ["json"], "date": "2026-01-01",
    "software": {"name": "fault-injector"},
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}]}],
}

HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fault:
    """One injected failure. ``kind``: html-502 | html-200 | status (with ``status``) |
    truncated (forward, then cut the answer) | slow (forward, then answer after ``delay_s``) |
    drop (forward, then close without answering) | refuse (close without forwarding) |
    json (answer ``status`` with ``body`` as JSON after ``delay_s``) | drip (the same answer,
    status line included, one byte every ``delay_s``; without ``content_length`` the headers come at once and the
    body, dripped, ends when the connection closes) | redirect (``status`` to ``location``)."""

    kind: str
    status: int = 500
    retry_after: str | None = None
    delay_s: float = 0.0
    outcome: dict[str, Any] | None = None
    body: Any = None
    location: str | None = None
    content_length: bool = True


def transaction_response(n: int, status: str = "201 Created") -> dict[str, Any]:
    """A well-formed transaction-response Bundle with ``n`` entries."""
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": status, "location": f"Patient/{i}/_history/1"}} for i in range(n)]}


@dataclass
class ProxyLog:
    transactions: int = 0
    forwarded_transactions: int = 0
    faults_applied: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)


class FaultProxy:
    """See module docstring. ``base_url`` is ``http://127.0.0.1:PORT/fhir``."""

    def __init__(self, upstream: str | None, port: int | None = None,
                 token_check: Any | None = None, smart_configuration: dict[str, Any] | None = None,
                 ssl_context: Any | None = None) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.port = port or free_port()
        self.faults: collections.deque[Fault] = collections.deque()
        self.log = ProxyLog()
        self.token_check = token_check
        self.smart_configuration = smart_configuration
        self.ssl_context = ssl_context
        #: path (after /fhir) -> (status, JSON body): canned answers for non-transaction requests.
        self.routes: dict[str, tuple[int, Any]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._session = requests.Session()
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/fhir"

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, "GET")

            def do_POST(self) -> None:
                proxy._handle(self, "POST")

            def do_PUT(self) -> None:
                proxy._handle(self, "PUT")

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str,
               headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _canned(self, h: BaseHTTPRequestHandler, fault: Fault) -> None:
        if fault.kind == "redirect":
            return self._reply(h, fault.status, b"", "text/plain", {"Location": fault.location or "/"})
        body = json.dumps(fault.body).encode()
        if fault.kind == "json":
            time.sleep(fault.delay_s)
            return self._reply(h, fault.status, body, "application/fhir+json")
        length = f"Content-Length: {len(body)}\r\n" if fault.content_length else ""
        raw = (f"HTTP/1.1 {fault.status} OK\r\nContent-Type: application/fhir+json\r\n"
               f"{length}\r\n").encode() + body
        h.close_connection = True
        start = 0 if fault.content_length else len(raw) - len(body)
        with contextlib.suppress(OSError):
            h.wfile.write(raw[:start])
            h.wfile.flush()
            for i in range(start, len(raw)):
                h.wfile.write(raw[i : i + 1])
                h.wfile.flush()
                time.sleep(fault.delay_s)
        return None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        if path.startswith("/fhir"):
            path = path[len("/fhir"):]
        if path in self.routes:
            status, canned = self.routes[path]
            return self._reply(h, status, json.dumps(canned).encode(), "application/fhir+json")
        if path.startswith("/.well-known/smart-configuration") and self.smart_configuration:
            return self._reply(h, 200, json.dumps(self.smart_configuration).encode(), "application/json")
        auth = h.headers.get("Authorization", "")
        self.log.authorizations.append(auth)
        if self.token_check is not None and not self.token_check(auth):
            outcome = {"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": "login", "diagnostics": "invalid or expired token"}]}
            return self._reply(h, 401, json.dumps(outcome).encode(), "application/fhir+json",
                               {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        is_transaction = method == "POST" and path in ("", "/")
        fault = None
        if is_transaction:
            with self._lock:
                self.log.transactions += 1
                fault = self.faults.popleft() if self.faults else None
                if fault:
                    self.log.faults_applied.append(fault.kind)
        if fault is not None and fault.kind in ("json", "drip", "redirect"):
            return self._canned(h, fault)
        if fault is not None and fault.kind in ("html-502", "html-200", "status", "refuse"):
            if fault.kind == "refuse":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return None
            if fault.kind.startswith("html"):
                return self._reply(h, 502 if fault.kind == "html-502" else 200, HTML_PAGE, "text/html")
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            outcome = fault.outcome or {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "exception", "diagnostics": f"injected HTTP {fault.status}"}]}
            return self._reply(h, fault.status, json.dumps(outcome).encode(), "application/fhir+json", extra)
        if self.upstream is None:
            if method == "GET" and path.startswith("/metadata"):
                return self._reply(h, 200, json.dumps(CAPABILITY_STATEMENT).encode(), "application/fhir+json")
            return self._reply(h, 502, b"no upstream", "text/plain")
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() in ("content-type", "accept", "prefer", "cache-control")}
        try:
            up = self._session.request(method, self.upstream + path, data=body or None, headers=headers, timeout=120)
        except requests.RequestException as exc:
            return self._reply(h, 502, f"upstream unreachable: {exc}".encode(), "text/plain")
        if is_transaction:
            with self._lock:
                self.log.forwarded_transactions += 1
        content, status = up.content, up.status_code
        ctype = up.headers.get("Content-Type", "application/fhir+json")
        if fault is not None:
            if fault.kind == "truncated":
                content = content[: max(1, len(content) // 2)]
            elif fault.kind == "slow":
                time.sleep(fault.delay_s)
            elif fault.kind == "drop":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._reply(h, status, content, ctype)
        return None


class SmartAuthServer:
    """authlib's OAuth2 AuthorizationServer (client credentials + JWT client assertion) on loopback."""

    def __init__(self, client_id: str, public_jwks: dict[str, Any], *, expires_in: int = 3600,
                 scope: str = "system/*.cruds") -> None:
        from authlib.integrations.flask_oauth2 import AuthorizationServer
        from authlib.oauth2.rfc6749 import ClientMixin, grants
        from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
        from flask import Flask
        from joserfc import jwt
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet
        from werkzeug.serving import make_server

        self.port = free_port()
        self.token_url = f"http://127.0.0.1:{self.port}/token"
        self.tokens: dict[str, float] = {}  # access token -> expiry (epoch s)
        self.assertions: list[dict[str, Any]] = []
        self.seen_jti: set[str] = set()
        outer = self

        class Client(ClientMixin):
            def get_client_id(self) -> str:
                return client_id

            def get_default_redirect_uri(self) -> str:
                return ""

            def get_allowed_scope(self, requested: str) -> str:
                return requested

            def check_redirect_uri(self, uri: str) -> bool:
                return False

            def check_client_secret(self, secret: str) -> bool:
                return False

            def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
                return method == JWTBearerClientAssertion.CLIENT_AUTH_METHOD

            def check_response_type(self, response_type: str) -> bool:
                return False

            def check_grant_type(self, grant_type: str) -> bool:
                return grant_type == "client_credentials"

        class SmartClientAssertion(JWTBearerClientAssertion):
            def get_audiences(self) -> list[str]:
                return [outer.token_url]

            def resolve_client_public_key(self, client: Any) -> Any:
                return KeySet.import_key_set(public_jwks)

            def validate_jti(self, claims: Any, jti: str) -> bool:
                if jti in outer.seen_jti:
                    return False
                outer.seen_jti.add(jti)
                return True

            def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
                # SMART Backend Services mandate RS384 / ES384 (not in joserfc's default list).
                from authlib.oauth2.rfc6749 import InvalidClientError

                try:
                    token = jwt.decode(assertion, resolve_key, algorithms=["RS384", "ES384"])
                except JoseError as e:
                    raise InvalidClientError(description=e.description) from e
                self.verify_claims(token.claims)
                outer.assertions.append({"header": dict(token.header), "claims": dict(token.claims)})
                return token.claims

        app = Flask("smart-auth-test")
        app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"client_credentials": expires_in}

        def query_client(cid: str) -> Any:
            return Client() if cid == client_id else None

        def save_token(token: dict[str, Any], request: Any) -> None:
            outer.tokens[token["access_token"]] = time.time() + token["expires_in"]

        server = AuthorizationServer(app, query_client=query_client, save_token=save_token)

        class ClientCredentials(grants.ClientCredentialsGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = [JWTBearerClientAssertion.CLIENT_AUTH_METHOD]

        server.register_grant(ClientCredentials)
        server.register_client_auth_method(JWTBearerClientAssertion.CLIENT_AUTH_METHOD, SmartClientAssertion())

        @app.post("/token")
        def issue_token() -> Any:
            return server.create_token_response()

        self._http = make_server("127.0.0.1", self.port, app, threaded=True)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def start(self) -> SmartAuthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()

    def check(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header carries a live token issued here."""
        if not authorization.startswith("Bearer "):
            return False
        expiry = self.tokens.get(authorization[7:])
        return expiry is not None and expiry > time.time()

    def revoke_all(self) -> None:
        self.tokens.clear()
