"""The Flask application factory."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, request

from leuk_fhir.service import api, auth, dicomweb, ops, page, problems
from leuk_fhir.service import deliveries as deliveries_bp
from leuk_fhir.service.metrics import ServiceMetrics
from leuk_fhir.service.runtime import LeukFhirService
from leuk_fhir.settings import Settings, load_settings


def create_app(
    settings: Settings | None = None, test_config: dict[str, Any] | None = None
) -> Flask:
    """Build the app, its :class:`LeukFhirService` and (unless told not to) start it.

    ``settings`` default to :func:`~leuk_fhir.settings.load_settings` (file + environment).
    ``test_config`` overrides Flask config; ``START_SERVICE`` False leaves workers, sender and
    DICOM listener stopped (call ``app.extensions["leuk_fhir"].start()`` yourself).
    """
    settings = settings or load_settings()
    app = Flask(__name__, static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.service.max_request_bytes,
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        SSE_HEARTBEAT_S=15.0,
        START_SERVICE=True,
        JSON_SORT_KEYS=False,
    )
    if test_config:
        app.config.update(test_config)
    # Werkzeug's access log would print query strings; the service logs analysis ids only.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    service = LeukFhirService(settings, outbox=app.config.get("OUTBOX"))
    app.extensions["leuk_fhir"] = service
    metrics = ServiceMetrics(service)
    service.metrics = metrics

    problems.init_app(app)
    app.after_request(_security_headers)
    metrics.init_app(app)
    auth.init_app(app)
    for blueprint in (api.bp, deliveries_bp.bp, dicomweb.bp, ops.bp, page.bp):
        app.register_blueprint(blueprint)

    if app.config["START_SERVICE"]:
        service.start()
    return app


def _security_headers(response: Response) -> Response:
    """Headers every answer carries: no MIME sniffing, no referrer, no framing by other sites
    (the page's sign-off button), and nothing about patients kept by browsers or proxies."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
    if request.path.startswith(("/v1/", "/dicomweb/")):
        response.headers["Cache-Control"] = "no-store"
    return response
