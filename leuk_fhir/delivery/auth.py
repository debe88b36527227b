"""Authentication to an EHR's FHIR endpoint: none, static bearer, basic, SMART Backend Services.

Each scheme is a :class:`requests.auth.AuthBase`; :meth:`EhrAuth.invalidate` drops a cached
credential after a 401 so that the next request fetches a fresh one.

SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html): the
client signs a one-time JWT (RS384 or ES384; ``iss`` = ``sub`` = client id, ``aud`` = token
URL, ``exp`` 5 minutes ahead, unique ``jti``) and exchanges it at the token endpoint for an
access token (``grant_type=client_credentials``); the token is cached and renewed shortly
before it expires. The token endpoint is read from ``[base]/.well-known/smart-configuration``
when not configured.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from requests.auth import AuthBase, HTTPBasicAuth

from leuk_fhir.errors import AuthenticationError, ConfigurationError
from leuk_fhir.settings import FhirSettings

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 300


class EhrAuth(AuthBase):
    """Base of the schemes; stateless schemes have nothing to invalidate."""

    def invalidate(self) -> None:
        """Forget any cached credential (called after a 401)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


class NoAuth(EhrAuth):
    """No credentials (a test server or a network-level trust)."""


class BearerAuth(EhrAuth):
    """A static bearer token issued out of band."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigurationError("fhir.bearer_token is empty", hint="set LEUK_FHIR_FHIR_BEARER_TOKEN")
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r


class BasicAuth(EhrAuth):
    """HTTP basic authentication."""

    def __init__(self, username: str, password: str) -> None:
        self._basic = HTTPBasicAuth(username, password)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return self._basic(r)


def _algorithm_for(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES384"
    raise ConfigurationError("SMART backend services need an RSA or EC private key (RS384/ES384)")


class SmartBackendAuth(EhrAuth):
    """SMART Backend Services: client credentials with a signed JWT assertion."""

    def __init__(
        self,
        *,
        client_id: str,
        private_key_pem: bytes,
        scope: str,
        key_id: str | None = None,
        token_url: str | None = None,
        fhir_base_url: str | None = None,
        session: requests.Session | None = None,
        timeout_s: float = 30.0,
        verify: bool | str = True,
        renew_before_s: float = 60.0,
    ) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if not client_id:
            raise ConfigurationError("SMART backend services need fhir.client_id")
        if not token_url and not fhir_base_url:
            raise ConfigurationError("SMART backend services need fhir.token_url or fhir.base_url")
        try:
            self._key = load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"cannot read the SMART private key: {exc}") from exc
        self.algorithm = _algorithm_for(self._key)
        self.client_id = client_id
        self.scope = scope
        self.key_id = key_id
        self._token_url = token_url
        self._base = fhir_base_url.rstrip("/") if fhir_base_url else None
        self._session = session or requests.Session()
        self._timeout = timeout_s
        self._verify = verify
        self._renew_before = renew_before_s
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        #: How many tokens were fetched (for logs and tests).
        self.tokens_fetched = 0

    @classmethod
    def from_settings(cls, settings: FhirSettings, session: requests.Session | None = None) -> SmartBackendAuth:
        if settings.private_key_path is None:
            raise ConfigurationError("SMART backend services need fhir.private_key_path")
        try:
            pem = Path(settings.private_key_path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {settings.private_key_path}: {exc}") from exc
        return cls(
            client_id=settings.client_id or "", private_key_pem=pem, scope=settings.scope,
            key_id=settings.key_id, token_url=settings.token_url, fhir_base_url=settings.base_url,
            session=session, timeout_s=settings.timeout_s,
            verify=str(settings.ca_bundle) if settings.ca_bundle else True,
        )

    @property
    def token_url(self) -> str:
        """The token endpoint, discovered from ``.well-known/smart-configuration`` once."""
        if self._token_url is None:
            url = f"{self._base}/.well-known/smart-configuration"
            try:
                resp = self._session.get(url, timeout=self._timeout, verify=self._verify, allow_redirects=False,
                                         headers={"Accept": "application/json"})
                resp.raise_for_status()
                body = resp.json() if resp.status_code == 200 else None
            except (requests.RequestException, ValueError) as exc:
                raise AuthenticationError(f"cannot discover the SMART token endpoint at {url}: {exc}") from exc
            endpoint = body.get("token_endpoint") if isinstance(body, dict) else None
            if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
                raise AuthenticationError(f"cannot discover the SMART token endpoint at {url}: HTTP "
                                          f"{resp.status_code}, the answer names no token_endpoint URL")
            self._token_url = endpoint
        return self._token_url

    def client_assertion(self) -> str:
        """A fresh signed JWT identifying this client to the token endpoint."""
        import jwt

        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "iat": now, "exp": now + ASSERTION_LIFETIME_S, "jti": uuid.uuid4().hex}
        headers = {"typ": "JWT", **({"kid": self.key_id} if self.key_id else {})}
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)  # type: ignore[arg-type]

    def access_token(self) -> str:
        """The cached access token, fetched or renewed when it is missing or about to expire."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._fetch()
            assert self._token is not None
            return self._token

    def _fetch(self) -> None:
        form = {
            "grant_type": "client_credentials", "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }
        try:
            resp = self._session.post(self.token_url, data=form, timeout=self._timeout, allow_redirects=False,
                                      verify=self._verify, headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            raise AuthenticationError(f"token endpoint {self.token_url} unreachable: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        token = body.get("access_token")
        if resp.status_code != 200 or not isinstance(token, str) or not token:
            detail = body.get("error_description") or body.get("error") or resp.text[:200]
            raise AuthenticationError(
                f"token endpoint refused client {self.client_id!r} (HTTP {resp.status_code}): {str(detail)[:200]}",
                hint="check the client id, the registered public key (JWKS) and the scope",
            )
        lifetime = body.get("expires_in", 300)
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            raise AuthenticationError(f"token endpoint {self.token_url} answered an invalid expires_in "
                                      f"{lifetime!r} (client {self.client_id!r})")
        margin = min(self._renew_before, lifetime / 2)
        self._token = token
        self._expires_at = time.monotonic() + lifetime - margin
        self.tokens_fetched += 1
        log.info("SMART access token for %s obtained (expires in %.0f s)", self.client_id, lifetime)

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.access_token()}"
        return r


def auth_from_settings(settings: FhirSettings, session: requests.Session | None = None) -> EhrAuth:
    """The scheme named by ``settings.auth``."""
    scheme = settings.auth.strip().lower()
    if scheme == "none":
        return NoAuth()
    if scheme == "bearer":
        return BearerAuth(settings.bearer_token or "")
    if scheme == "basic":
        if not settings.username or settings.password is None:
            raise ConfigurationError("basic auth needs fhir.username and fhir.password")
        return BasicAuth(settings.username, settings.password)
    if scheme in ("smart-backend", "smart"):
        return SmartBackendAuth.from_settings(settings, session)
    raise ConfigurationError(f"unknown fhir.auth {settings.auth!r}", hint="none | bearer | basic | smart-backend")
