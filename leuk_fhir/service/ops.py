"""Operational endpoints, open to anyone: liveness, readiness, metrics, the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app

from leuk_fhir import __version__
from leuk_fhir.service.auth import public
from leuk_fhir.service.openapi import build_openapi

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
@public
def healthz() -> dict[str, Any]:
    """The process is up (it may not be ready yet)."""
    return {"status": "ok", "version": __version__}


@bp.get("/readyz")
@public
def readyz() -> tuple[dict[str, Any], int]:
    """Ready to take work: database, workers and model (plus listener and sender if on)."""
    readiness = current_app.extensions["leuk_fhir"].readiness()
    return readiness, 200 if readiness["ready"] else 503


@bp.get("/metrics")
@public
def metrics() -> Response:
    """Prometheus text exposition."""
    return current_app.extensions["leuk_fhir"].metrics.render()


@bp.get("/openapi.json")
@public
def openapi() -> dict[str, Any]:
    """This API's OpenAPI 3 description."""
    return build_openapi()
