"""``/v1/deliveries``: the outbox of Bundles for the EHR, dead letters included."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, current_app, request

from leuk_fhir.delivery import DeliveryStatus
from leuk_fhir.errors import InputError, NotFoundError
from leuk_fhir.service.auth import allow
from leuk_fhir.service.problems import query_limit

bp = Blueprint("deliveries", __name__, url_prefix="/v1")

_TIMES = ("created_at", "updated_at", "next_attempt_at", "delivered_at")


def delivery_json(entry: Any) -> dict[str, Any]:
    """The API's view of an outbox entry (never its Bundle, which carries patient data)."""
    data = entry.as_dict(with_bundle=False)
    data["state"] = data["status"]
    for name in _TIMES:
        if data.get(name) is not None:
            data[name] = datetime.fromtimestamp(data[name], UTC).isoformat(timespec="seconds")
    return data


@bp.get("/deliveries")
@allow("clinician")
def list_deliveries() -> dict[str, Any]:
    """Newest first; ``?state=`` filters (e.g. ``dead`` for dead letters)."""
    limit = query_limit(100, 1000)
    outbox = current_app.extensions["leuk_fhir"].outbox
    status = request.args.get("state") or request.args.get("status") or None
    if status is not None and status not in {s.value for s in DeliveryStatus}:
        raise InputError(f"state must be one of {[s.value for s in DeliveryStatus]}")
    entries = outbox.list(status, limit=limit)
    return {"deliveries": [delivery_json(e) for e in entries], "stats": outbox.stats()}


@bp.post("/deliveries/<delivery_id>/retry")
@allow()
def retry_delivery(delivery_id: str) -> dict[str, Any]:
    """Queue a failed or dead-lettered delivery again (admin)."""
    outbox = current_app.extensions["leuk_fhir"].outbox
    try:
        number = int(delivery_id)
    except ValueError as exc:
        raise NotFoundError(f"no delivery {delivery_id!r}") from exc
    if not 0 < number < 2**63:  # beyond SQLite's integers
        raise NotFoundError(f"no delivery {delivery_id!r}")
    return delivery_json(outbox.retry(number))
