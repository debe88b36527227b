"""``POST /dicomweb/studies``: STOW-RS intake; each stored instance becomes one analysis.

Parsing, validation and spooling are :func:`leuk_fhir.adapters.stow.handle_stow`'s; this view
queues every stored instance and answers the DICOM JSON response (200 all stored, 202 some,
409 none). When the analysis queue is full for every instance, the answer is 503 with
Retry-After and nothing is kept.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, json, request

from leuk_fhir.acquisition import Transport
from leuk_fhir.errors import LeukFhirError, QueueFullError
from leuk_fhir.service.auth import allow
from leuk_fhir.service.runtime import STOW_SPOOL

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")


def _stow(study_uid: str | None) -> Response:
    from leuk_fhir.adapters.stow import DICOM_JSON_MEDIA_TYPE, FailedInstance, handle_stow

    service = current_app.extensions["leuk_fhir"]
    spool = service.data_dir / STOW_SPOOL
    result: Any = handle_stow(
        request.get_data(), request.content_type, spool_dir=spool,
        image_settings=service.settings.image, study_uid=study_uid,
    )
    queued, queue_full = [], []
    for instance in result.stored:
        ref = instance.reference
        try:
            service.submit_file(
                instance.path, transport=Transport.STOW_RS, media_type="application/dicom",
                filename=f"{ref.sop_instance_uid}.dcm", submitted_by="STOW-RS",
            )
            queued.append(instance)
        except LeukFhirError as exc:
            instance.path.unlink(missing_ok=True)
            if isinstance(exc, QueueFullError):
                queue_full.append(exc)
            result.failed.append(FailedInstance(
                ref.sop_class_uid, ref.sop_instance_uid, exc.dicom_status, str(exc)))
    result.stored = queued
    if queue_full and not queued and len(queue_full) == len(result.failed):
        raise queue_full[0]
    body = result.to_dicom_json(request.host_url.rstrip("/") + "/dicomweb")
    return Response(json.dumps(body), status=result.http_status, mimetype=DICOM_JSON_MEDIA_TYPE)


@bp.post("/studies")
@allow("device")
def stow_studies() -> Response:
    """Store instances (multipart/related; type="application/dicom") and queue analyses."""
    return _stow(None)


@bp.post("/studies/<study_uid>")
@allow("device")
def stow_study(study_uid: str) -> Response:
    """Store instances of one study (others are refused in the FailedSOPSequence)."""
    return _stow(study_uid)
