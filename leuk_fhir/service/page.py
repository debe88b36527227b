"""The clinician's page: plain HTML/CSS/JS from ``static/``, no build step, no CDN."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from leuk_fhir.service.auth import public

STATIC_DIR = Path(__file__).parent / "static"

bp = Blueprint("page", __name__)

_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "frame-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'self'"
)


@bp.get("/")
@public
def index() -> Response:
    """The live list of analyses and the detail view (one page)."""
    response = send_from_directory(STATIC_DIR, "index.html", max_age=0)
    response.headers["Content-Security-Policy"] = _CSP
    return response


@bp.get("/static/<path:filename>")
@public
def static_file(filename: str) -> Response:
    """The page's scripts and styles."""
    return send_from_directory(STATIC_DIR, filename, max_age=300)
