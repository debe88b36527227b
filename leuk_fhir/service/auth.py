"""API tokens with roles, and the per-client request rate limit.

Roles: ``device`` submits images; ``clinician`` reads analyses and signs reports off; ``admin``
may do everything. Every view declares who may call it with :func:`allow` (or :func:`public`);
a view that declares nothing is refused, so a new route cannot open by accident. With
``ServiceSettings.require_auth`` off (the loopback demo) every caller acts as an anonymous
admin, and a sign-off must name the person in its body.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, current_app, g, request

from leuk_fhir.errors import AccessDeniedError, CredentialsRequiredError, RateLimitedError
from leuk_fhir.service.store import ServiceStore

F = TypeVar("F", bound=Callable[..., Any])

_ROLES_ATTR = "_leuk_fhir_roles"
PUBLIC = "public"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and role, or the anonymous demo user."""

    name: str
    role: str
    token_id: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.token_id is not None


ANONYMOUS = Principal(name="anonymous (authentication off)", role="admin")


def allow(*roles: str) -> Callable[[F], F]:
    """Declare the roles that may call a view (``admin`` is always allowed)."""

    def mark(view: F) -> F:
        setattr(view, _ROLES_ATTR, frozenset({*roles, "admin"}))
        return view

    return mark


def public(view: F) -> F:
    """Declare a view open to anyone (health, metrics, the OpenAPI description, the page)."""
    setattr(view, _ROLES_ATTR, frozenset({PUBLIC}))
    return view


def roles_of(view: Callable[..., Any]) -> frozenset[str]:
    return getattr(view, _ROLES_ATTR, frozenset())


def current_principal() -> Principal:
    return g.get("principal", ANONYMOUS)


class RateLimiter:
    """Token bucket per client key: ``per_minute`` requests, bursting up to the same number."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise RateLimitedError(
                    f"more than {self.per_minute} requests per minute from this client",
                    retry_after_s=max(1, int((1.0 - tokens) / rate + 0.999)),
                )
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget idle clients
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 120}


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    # EventSource and <img> cannot send headers: GET requests may carry ?access_token=.
    if request.method == "GET":
        return request.args.get("access_token") or None
    return None


def _authenticate() -> None:
    """``before_request`` hook: identify the caller, apply the rate limit, check the role."""
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None:
        return  # 404 / 405 are answered by Flask
    allowed = roles_of(view)
    if PUBLIC in allowed:
        return
    service = current_app.extensions["leuk_fhir"]
    store: ServiceStore = service.store
    limiter: RateLimiter = service.rate_limiter
    if not service.settings.service.require_auth:
        g.principal = ANONYMOUS
        limiter.check(f"addr:{request.remote_addr}")
        return
    clear = _bearer_token()
    token = store.find_token(clear) if clear else None
    if token is None:
        limiter.check(f"addr:{request.remote_addr}")
        raise CredentialsRequiredError(
            "a valid API token is required",
            hint="send 'Authorization: Bearer <token>'; create one with 'leuk-fhir token create'",
        )
    g.principal = Principal(name=token.name, role=token.role, token_id=token.id)
    limiter.check(f"token:{token.id}")
    if token.role not in allowed:
        raise AccessDeniedError(
            f"role {token.role!r} may not call this endpoint",
            hint=f"needs one of: {', '.join(sorted(allowed))}",
        )


def init_app(app: Flask) -> None:
    app.before_request(_authenticate)
