"""Errors mapped once to HTTP: RFC 7807 problem details, or a FHIR OperationOutcome.

Every :class:`~leuk_fhir.errors.LeukFhirError` carries its HTTP status; werkzeug's HTTP errors
(404 route, 405, 413 body too large) are mapped the same way. Unexpected exceptions become a
500 problem without internals. FHIR-facing endpoints (their path ends in ``/fhir``) answer an
OperationOutcome in ``application/fhir+json`` instead.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from typing import Any

from flask import Flask, Response, current_app, json, request
from werkzeug.exceptions import HTTPException

from leuk_fhir.errors import (
    InputError,
    LeukFhirError,
    QueueFullError,
    RateLimitedError,
    is_storage_full,
    storage_full_error,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
FHIR_JSON = "application/fhir+json"
PROBLEM_TYPE_BASE = "urn:leuk-fhir:problem:"

#: OperationOutcome.issue.code for an HTTP status (http://hl7.org/fhir/valueset-issue-type.html).
_ISSUE_CODES = {
    400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
    409: "conflict", 413: "too-costly", 415: "not-supported", 422: "processing",
    429: "throttled", 503: "transient", 507: "transient",
}


def _is_fhir_request() -> bool:
    return request.path.rstrip("/").endswith("/fhir")


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    code: str | None = None,
    hint: str | None = None,
    retry_after_s: int | None = None,
) -> Response:
    """Build the error response (problem details, or OperationOutcome on FHIR endpoints)."""
    if _is_fhir_request():
        body: dict[str, Any] = {
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error" if status < 500 else "fatal",
                "code": _ISSUE_CODES.get(status, "exception"),
                "diagnostics": " ".join(x for x in (detail or title, hint) if x),
            }],
        }
        mimetype = FHIR_JSON
    else:
        body = {
            "type": f"{PROBLEM_TYPE_BASE}{code}" if code else "about:blank",
            "title": title,
            "status": status,
            "instance": request.path,
        }
        if detail:
            body["detail"] = detail
        if hint:
            body["hint"] = hint
        mimetype = PROBLEM_JSON
    response = Response(json.dumps(body), status=status, mimetype=mimetype)
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(retry_after_s)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="leuk-fhir"'
    return response


def _from_leuk_error(exc: LeukFhirError) -> Response:
    retry = exc.retry_after_s if isinstance(exc, QueueFullError | RateLimitedError) else None
    title = exc.code.replace("-", " ").capitalize()
    if exc.http_status >= 500 and not isinstance(exc, QueueFullError):
        log.warning("%s %s failed: %s", request.method, request.endpoint, exc.code)
    return problem_response(
        exc.http_status, title, exc.message, code=exc.code, hint=exc.hint, retry_after_s=retry
    )


def _from_http_error(exc: HTTPException) -> Response:
    return problem_response(exc.code or 500, exc.name, exc.description, code=None)


#: Below this much free space, an I/O or SQLite error is taken for a full disk (SQLite then
#: reports "disk I/O error" as often as "database or disk is full").
NEARLY_FULL_BYTES = 1 << 20


def _disk_full(exc: Exception) -> bool:
    if is_storage_full(exc):
        return True
    if not isinstance(exc, (OSError, sqlite3.Error)):
        return False
    service = current_app.extensions.get("leuk_fhir")
    try:
        return service is not None and shutil.disk_usage(service.data_dir).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def _from_unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return _from_http_error(exc)
    if _disk_full(exc):
        log.error("%s %s: the data directory's disk is full: %s",
                  request.method, request.endpoint, exc)
        return _from_leuk_error(storage_full_error(exc, "the service's data directory"))
    log.exception("unexpected error in %s %s", request.method, request.endpoint)
    return problem_response(500, "Internal Server Error", "an unexpected error occurred")


def init_app(app: Flask) -> None:
    """Register the error mapping on ``app``."""
    app.register_error_handler(LeukFhirError, _from_leuk_error)
    app.register_error_handler(HTTPException, _from_http_error)
    app.register_error_handler(Exception, _from_unexpected)


def query_limit(default: int, maximum: int) -> int:
    """The ``?limit=`` of a list endpoint, clamped to 1..maximum; not an integer is a 400."""
    try:
        return min(max(int(request.args.get("limit", default)), 1), maximum)
    except ValueError as exc:
        raise InputError("limit must be an integer") from exc
