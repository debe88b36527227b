"""The ``/v1`` JSON API: analyses, sign-off, deliveries, model, live events."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from flask import Blueprint, Response, current_app, json, request, send_file, url_for

from leuk_fhir.acquisition import PatientInfo, Scope, Transport
from leuk_fhir.errors import FhirMappingError, InputError, LeukFhirError, NotFoundError
from leuk_fhir.fhir.report import fhir_gender
from leuk_fhir.pipeline import AnalysisOrder
from leuk_fhir.service.auth import allow, current_principal, public
from leuk_fhir.service.problems import query_limit
from leuk_fhir.service.runtime import LeukFhirService
from leuk_fhir.service.store import COMPLETED, FAILED, UNFINISHED, AnalysisRecord

bp = Blueprint("api", __name__, url_prefix="/v1")

#: A literal reference (``Practitioner/123``) or a conditional one by identifier
#: (``Practitioner?identifier=system|value``), in the characters FHIR ids and URLs allow.
_REFERENCE = re.compile(
    r"^(Practitioner|PractitionerRole|CareTeam|Organization)"
    r"(/[A-Za-z0-9\-.]{1,64}|\?identifier=[A-Za-z0-9\-._~:/|%]{1,200})$"
)
_RAW_TYPES = ("image/", "application/dicom", "application/octet-stream")
#: C0 and C1 control characters and bidirectional overrides: never valid in FHIR strings.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_LINE_BREAKS = re.compile(r"[\t\n\r]")
#: Longest accepted name or identifier, and comment.
MAX_FIELD = 200
MAX_COMMENT = 4000
ANALYSIS_STATES = (*UNFINISHED, COMPLETED, FAILED)


def service() -> LeukFhirService:
    return current_app.extensions["leuk_fhir"]


def text_value(value: Any, name: str, *, max_length: int = MAX_FIELD,
               multiline: bool = False) -> str | None:
    """A client's text field, stripped; None when absent or blank. InputError (400) for a
    non-string, an overlong value, or control characters (line breaks only in ``multiline``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, not {type(value).__name__}")
    value = value.strip()
    if len(value) > max_length:
        raise InputError(f"{name} is longer than {max_length} characters")
    if _CONTROL.search(value) or (not multiline and _LINE_BREAKS.search(value)):
        raise InputError(f"{name} contains control characters")
    return value or None


def _field(name: str, *, query: bool = False) -> str | None:
    """A form field (and, for ``query``, a URL parameter: never patient data, which would end
    up in access logs)."""
    value = request.form.get(name)
    if value is None and query:
        value = request.args.get(name)
    return text_value(value, name)


def _order_from_request() -> AnalysisOrder:
    practitioner = _field("ordering_practitioner", query=True)
    if practitioner and not _REFERENCE.match(practitioner):
        raise InputError(
            f"ordering_practitioner {practitioner!r} is not a FHIR reference",
            hint="use e.g. 'Practitioner/123', 'CareTeam/haem-oncall' or "
            "'Practitioner?identifier=system|value'",
        )
    birth = _field("patient_birth_date")
    try:
        birth_date = date.fromisoformat(birth) if birth else None
    except ValueError as exc:
        raise InputError("patient_birth_date must be YYYY-MM-DD") from exc
    if birth_date and birth_date > date.today():
        raise InputError(f"patient_birth_date {birth_date} is in the future")
    sex = _field("patient_sex")
    try:
        fhir_gender(sex)  # refused now, not after the model has run
    except FhirMappingError as exc:
        raise InputError(f"patient_sex: {exc.message}", hint="male, female, other, unknown (or M, F, O, U)") from None
    patient = PatientInfo(
        identifier=_field("patient_identifier"),
        name=_field("patient_name"),
        birth_date=birth_date,
        sex=sex,
    )
    return AnalysisOrder(
        ordering_practitioner=practitioner,
        patient=None if patient == PatientInfo() else patient,
    )


def _scope_from_request() -> Scope | None:
    scope = _field("scope", query=True)
    if scope is None:
        return None
    try:
        return Scope(scope)
    except ValueError as exc:
        raise InputError(f"scope must be one of {[s.value for s in Scope]}") from exc


def analysis_json(record: AnalysisRecord, *, detail: bool) -> dict[str, Any]:
    """The API's view of an analysis; ``detail`` adds per-cell evidence and the FHIR Bundle."""
    result = record.result or {}
    model = result.get("model")
    body: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "transport": record.transport,
        "scope": record.scope,
        "outcome": record.outcome,
        "blast_percentage": record.blast_percentage,
        "model": {k: model[k] for k in ("name", "version", "is_demo")} if model else None,
        "report": {
            "identifier": record.report_identifier,
            "status": record.report_status,
            "signed_off_by": record.signed_off_by,
            "signed_off_role": record.signed_off_role,
            "signed_off_at": record.signed_off_at,
            "comment": record.signoff_comment,
        },
        "error": (
            {"code": record.error_code, "message": record.error_message}
            if record.error_code else None
        ),
        "links": {
            "self": url_for("api.get_analysis", analysis_id=record.id),
            "image": url_for("api.get_analysis_image", analysis_id=record.id),
            "report_pdf": url_for("api.get_report_pdf", analysis_id=record.id),
            "report_html": url_for("api.get_report_html", analysis_id=record.id),
            "fhir": url_for("api.get_fhir_bundle", analysis_id=record.id),
            "sign_off": url_for("api.sign_off", analysis_id=record.id),
        },
    }
    if detail:
        body.update({
            "filename": record.filename,
            "media_type": record.media_type,
            "content_sha256": record.content_sha256,
            "submitted_by": record.submitted_by,
            "order": record.order,
            "attempts": record.attempts,
            "findings": result or None,
            "deliveries": [_delivery_state(key) for key in record.delivery_keys],
            "fhir_bundle": _read_bundle(record.id),
        })
    return body


def _read_bundle(analysis_id: str) -> dict[str, Any] | None:
    path = service().analysis_dir(analysis_id) / "bundle.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _delivery_state(key: str) -> dict[str, Any]:
    from leuk_fhir.service.deliveries import delivery_json

    try:
        return delivery_json(service().outbox.get_by_key(key))
    except NotFoundError:
        return {"key": key, "state": "unknown"}


@bp.post("/analyses")
@allow("device")
def submit_analysis() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Accept one or more images (multipart) or one raw image/DICOM body; 202 when queued."""
    svc = service()
    order = _order_from_request()
    scope = _scope_from_request()
    submitted_by = current_principal().name
    uploads: list[tuple[Any, str | None, str | None]] = []
    if request.mimetype == "multipart/form-data":
        others = sorted(set(request.files) - {"image"})
        if others:
            raise InputError(
                f"unexpected file field(s) {others}: send each image as the field 'image'"
            )
        for f in request.files.getlist("image"):
            if f.filename or f.mimetype:
                uploads.append((f.stream, f.filename, f.mimetype))
    elif request.mimetype and request.mimetype.startswith(_RAW_TYPES):
        uploads.append((request.stream, request.args.get("filename"), request.mimetype))
    if not uploads:
        raise InputError(
            "no image in the request",
            hint="send multipart/form-data with an 'image' file, or a raw image/* or "
            "application/dicom body",
        )
    accepted: list[AnalysisRecord] = []
    rejected: list[dict[str, Any]] = []
    for stream, filename, media_type in uploads:
        try:
            accepted.append(svc.submit_stream(
                stream, filename=filename, media_type=media_type, transport=Transport.HTTP,
                scope=scope, order=order, submitted_by=submitted_by,
            ))
        except LeukFhirError as exc:
            if not accepted and len(uploads) == 1:
                raise
            rejected.append({"filename": filename, "code": exc.code, "detail": str(exc)})
    if not accepted:
        raise InputError("no image was accepted", hint=json.dumps(rejected))
    items = [
        {"id": r.id, "status": r.status, "href": url_for("api.get_analysis", analysis_id=r.id)}
        for r in accepted
    ]
    body: dict[str, Any] = {"id": accepted[0].id, "status": accepted[0].status, "analyses": items}
    if rejected:
        body["rejected"] = rejected
    return body, 202, {"Location": items[0]["href"]}


@bp.get("/analyses")
@allow("clinician")
def list_analyses() -> dict[str, Any]:
    """Newest first; ``?status=`` filters, ``?before=<created_at>`` pages."""
    limit = query_limit(50, 500)
    status = request.args.get("status") or None
    if status is not None and status not in ANALYSIS_STATES:
        raise InputError(f"status must be one of {list(ANALYSIS_STATES)}")
    records = service().store.list_analyses(
        status=status, limit=limit,
        before=request.args.get("before") or None,
    )
    return {
        "analyses": [analysis_json(r, detail=False) for r in records],
        "next_before": records[-1].created_at if len(records) == limit else None,
        "counts": service().store.count_by_status(),
    }


@bp.get("/analyses/<analysis_id>")
@allow("clinician")
def get_analysis(analysis_id: str) -> dict[str, Any]:
    return analysis_json(service().store.get_analysis(analysis_id), detail=True)


def _analysis_file(analysis_id: str, name: str, what: str) -> Any:
    service().store.get_analysis(analysis_id)  # 404 for an unknown id
    path = service().analysis_dir(analysis_id) / name
    if not path.exists():
        raise NotFoundError(f"analysis {analysis_id} has no {what} (yet)")
    return path


@bp.get("/analyses/<analysis_id>/image")
@allow("clinician")
def get_analysis_image(analysis_id: str) -> Response:
    """A PNG preview of the analysed image; cell boxes scale by ``findings.image.scale``."""
    return send_file(_analysis_file(analysis_id, "preview.png", "image preview"),
                     mimetype="image/png")


@bp.get("/analyses/<analysis_id>/report.pdf")
@allow("clinician")
def get_report_pdf(analysis_id: str) -> Response:
    return send_file(_analysis_file(analysis_id, "report.pdf", "PDF report"),
                     mimetype="application/pdf", download_name=f"{analysis_id}.pdf")


@bp.get("/analyses/<analysis_id>/report.html")
@allow("clinician")
def get_report_html(analysis_id: str) -> Response:
    response = send_file(_analysis_file(analysis_id, "report.html", "HTML report"),
                         mimetype="text/html")
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return response


@bp.get("/analyses/<analysis_id>/fhir")
@allow("clinician")
def get_fhir_bundle(analysis_id: str) -> Response:
    """The FHIR transaction Bundle (errors here are FHIR OperationOutcomes)."""
    path = _analysis_file(analysis_id, "bundle.json", "FHIR Bundle")
    return Response(path.read_bytes(), mimetype="application/fhir+json")


def _json_body() -> dict[str, Any]:
    """The request's JSON object; ``{}`` for an empty body. A body that is not a JSON object
    is a 400, never read as empty (a truncated sign-off must not go through)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    if not request.is_json:
        raise InputError("send the body as application/json")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    return body


@bp.post("/analyses/<analysis_id>/sign-off")
@allow("clinician")
def sign_off(analysis_id: str) -> dict[str, Any]:
    """A clinician's review: the report goes preliminary -> final, with the person recorded."""
    body = _json_body()
    principal = current_principal()
    comment = text_value(body.get("comment"), "comment", max_length=MAX_COMMENT, multiline=True)
    given_identifier = text_value(body.get("practitioner_identifier"), "practitioner_identifier")
    if principal.authenticated:
        # The token's person: a body can neither sign for someone else nor under another
        # practitioner's identifier.
        for field in ("signed_off_by", "practitioner_identifier"):
            if body.get(field) is not None:
                raise InputError(
                    f"{field} cannot be set with authentication on: the token names who signs"
                )
        name = principal.name
        identifier = principal.token_id
    else:
        name = text_value(body.get("signed_off_by"), "signed_off_by") or ""
        if not name:
            raise InputError(
                "signed_off_by is required: name the clinician who reviewed the report",
                hint="with authentication on, the token's name is used",
            )
        identifier = given_identifier or re.sub(
            r"[^A-Za-z0-9.-]+", "-", name).strip("-").lower()
    record = service().sign_off(
        analysis_id, signed_off_by=name, practitioner_identifier=str(identifier),
        role=principal.role, comment=comment,
    )
    return analysis_json(record, detail=False)


@bp.get("/model")
@public
def get_model() -> dict[str, Any]:
    """The model in use; ``is_demo`` tells the page to show the DEMO banner (even before a
    user has signed in, so it is public: it names the model, nothing about patients)."""
    svc = service()
    if not svc.model_loaded:
        return {"loaded": False, "error": svc.model_error}
    info = svc.pipeline.model_info
    return {
        "loaded": True,
        "name": info.name,
        "version": info.version,
        "sha256": info.sha256,
        "is_demo": info.is_demo,
        "classes": [{"name": c.name, "display": c.display, "is_blast": c.is_blast}
                    for c in info.classes],
        "metrics": info.metrics,
    }


@bp.get("/events")
@allow("clinician")
def events() -> Response:
    """Server-Sent Events: ``analysis`` (status changes) and ``alert`` (blasts detected)."""
    stream = service().broker.stream(current_app.config.get("SSE_HEARTBEAT_S", 15.0))
    return Response(stream, mimetype="text/event-stream", headers={
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })
