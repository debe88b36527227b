"""The OpenAPI 3 description of the service, kept next to the code it describes.

``tests/service/test_service_openapi.py`` checks that every Flask route is documented here and
every documented path is a route, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from leuk_fhir import __version__

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_ID = {"name": "analysis_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _json(schema_ref: str, description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


def _op(
    summary: str,
    roles: str,
    responses: dict[str, Any],
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "description": f"Roles: {roles}.",
        "responses": {**responses, "default": _PROBLEM},
    }
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    if public:
        op["security"] = []
    return op


def _file(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string", "format": "binary"}}}}


_SUBMIT_FIELDS = {
    "image": {"type": "array", "items": {"type": "string", "format": "binary"},
              "description": "One or more images (PNG, JPEG, TIFF) or DICOM files; one analysis each."},
    "scope": {"type": "string", "enum": ["cell", "field", "slide"],
              "description": "What the image shows; guessed from its size when absent."},
    "ordering_practitioner": {"type": "string", "example": "Practitioner/123",
                              "description": "FHIR reference alerted when blasts are detected."},
    "patient_identifier": {"type": "string"},
    "patient_name": {"type": "string", "description": "Family^Given or free text"},
    "patient_birth_date": {"type": "string", "format": "date"},
    "patient_sex": {"type": "string"},
}

PATHS: dict[str, dict[str, Any]] = {
    "/v1/analyses": {
        "post": _op(
            "Submit images for analysis", "device, admin",
            {"202": _json("Accepted", "Persisted and queued"),
             "413": _PROBLEM, "415": _PROBLEM, "422": _PROBLEM, "429": _PROBLEM,
             "503": {"description": "Queue full; see Retry-After", "headers": {
                 "Retry-After": {"schema": {"type": "integer"}}}}},
            body={"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": _SUBMIT_FIELDS,
                                                   "required": ["image"]}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            }},
        ),
        "get": _op(
            "List analyses, newest first", "clinician, admin",
            {"200": _json("AnalysisList")},
            params=[
                {"name": "status", "in": "query", "schema": {
                    "type": "string", "enum": ["queued", "running", "completed", "failed"]}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 50}},
                {"name": "before", "in": "query", "schema": {"type": "string"},
                 "description": "created_at cursor (next_before of the previous page)"},
            ],
        ),
    },
    "/v1/analyses/{analysis_id}": {
        "get": _op("One analysis: status, findings, per-cell evidence, FHIR Bundle, deliveries",
                   "clinician, admin", {"200": _json("Analysis"), "404": _PROBLEM},
                   params=[_ID]),
    },
    "/v1/analyses/{analysis_id}/image": {
        "get": _op("PNG preview of the analysed image", "clinician, admin",
                   {"200": _file("image/png", "preview"), "404": _PROBLEM}, params=[_ID]),
    },
    "/v1/analyses/{analysis_id}/report.pdf": {
        "get": _op("The report as PDF", "clinician, admin",
                   {"200": _file("application/pdf", "report"), "404": _PROBLEM}, params=[_ID]),
    },
    "/v1/analyses/{analysis_id}/report.html": {
        "get": _op("The report as HTML", "clinician, admin",
                   {"200": _file("text/html", "report"), "404": _PROBLEM}, params=[_ID]),
    },
    "/v1/analyses/{analysis_id}/fhir": {
        "get": _op("The FHIR R4 transaction Bundle (errors as OperationOutcome)", "clinician, admin",
                   {"200": {"description": "Bundle", "content": {"application/fhir+json": {
                       "schema": {"type": "object"}}}},
                    "404": {"description": "OperationOutcome", "content": {
                        "application/fhir+json": {"schema": {"type": "object"}}}}},
                   params=[_ID]),
    },
    "/v1/analyses/{analysis_id}/sign-off": {
        "post": _op(
            "Clinician sign-off: report preliminary -> final, the person recorded",
            "clinician, admin",
            {"200": _json("AnalysisSummary"), "404": _PROBLEM, "409": _PROBLEM},
            params=[_ID],
            body={"content": {"application/json": {"schema": {"type": "object", "properties": {
                "signed_off_by": {"type": "string",
                                  "description": "Required when authentication is off; else the token's name is used."},
                "practitioner_identifier": {"type": "string"},
                "comment": {"type": "string"},
            }}}}},
        ),
    },
    "/v1/deliveries": {
        "get": _op("Outbox: deliveries to the EHR, dead letters included", "clinician, admin",
                   {"200": _json("DeliveryList")},
                   params=[{"name": "state", "in": "query", "schema": {"type": "string"}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer"}}]),
    },
    "/v1/deliveries/{delivery_id}/retry": {
        "post": _op("Send a failed or dead-lettered delivery again", "admin",
                    {"200": _json("Delivery"), "404": _PROBLEM, "409": _PROBLEM},
                    params=[{"name": "delivery_id", "in": "path", "required": True,
                             "schema": {"type": "string"}}]),
    },
    "/v1/model": {
        "get": _op("The model in use (is_demo: show the DEMO banner)", "anyone",
                   {"200": {"description": "Model", "content": {"application/json": {
                       "schema": {"type": "object"}}}}}, public=True),
    },
    "/v1/events": {
        "get": _op("Server-Sent Events: 'analysis' status changes and 'alert' on blasts",
                   "clinician, admin (token may be passed as ?access_token=)",
                   {"200": {"description": "event stream", "content": {"text/event-stream": {
                       "schema": {"type": "string"}}}}}),
    },
    "/dicomweb/studies": {
        "post": _op(
            "STOW-RS: store DICOM instances (multipart/related; type=application/dicom)",
            "device, admin",
            {"200": {"description": "All stored (DICOM JSON response)", "content": {
                "application/dicom+json": {"schema": {"type": "object"}}}},
             "202": {"description": "Some failed (DICOM JSON with FailedSOPSequence)"},
             "409": {"description": "None stored"}},
            body={"required": True, "content": {"multipart/related": {
                "schema": {"type": "string", "format": "binary"}}}},
        ),
    },
    "/dicomweb/studies/{study_uid}": {
        "post": _op(
            "STOW-RS into one study (instances of other studies fail)", "device, admin",
            {"200": {"description": "All stored (DICOM JSON response)"},
             "202": {"description": "Some failed"}, "409": {"description": "None stored"}},
            params=[{"name": "study_uid", "in": "path", "required": True, "schema": {"type": "string"}}],
            body={"required": True, "content": {"multipart/related": {
                "schema": {"type": "string", "format": "binary"}}}},
        ),
    },
    "/healthz": {"get": _op("Liveness", "anyone", {"200": {"description": "alive"}}, public=True)},
    "/readyz": {"get": _op("Readiness (database, workers, model, listener, sender)", "anyone",
                           {"200": {"description": "ready"}, "503": {"description": "not ready"}},
                           public=True)},
    "/metrics": {"get": _op("Prometheus metrics", "anyone", {"200": {
        "description": "text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        public=True)},
    "/openapi.json": {"get": _op("This document", "anyone", {"200": {"description": "OpenAPI 3"}},
                                 public=True)},
    "/": {"get": _op("The clinician's page", "anyone (the page asks for a token when needed)",
                     {"200": {"description": "HTML", "content": {"text/html": {}}}}, public=True)},
    "/static/{filename}": {"get": _op(
        "The page's scripts and styles", "anyone",
        {"200": {"description": "file"}, "404": _PROBLEM},
        params=[{"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}],
        public=True)},
}

_ANALYSIS_SUMMARY = {
    "type": "object",
    "required": ["id", "status", "created_at", "report", "links"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "running", "completed", "failed"]},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "transport": {"type": "string"},
        "scope": {"type": "string", "nullable": True},
        "outcome": {"type": "string", "nullable": True,
                    "enum": ["blasts-detected", "no-blasts-detected", "indeterminate", None]},
        "blast_percentage": {"type": "number", "nullable": True},
        "model": {"type": "object", "nullable": True},
        "report": {"type": "object", "properties": {
            "identifier": {"type": "string", "nullable": True},
            "status": {"type": "string", "nullable": True, "enum": ["preliminary", "final", None]},
            "signed_off_by": {"type": "string", "nullable": True},
            "signed_off_at": {"type": "string", "nullable": True}}},
        "error": {"type": "object", "nullable": True},
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                   "description": "Token from 'leuk-fhir token create'"}},
    "responses": {"Problem": {"description": "RFC 7807 problem details", "content": {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
    "schemas": {
        "Problem": {"type": "object", "required": ["type", "title", "status"], "properties": {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
            "hint": {"type": "string"}, "instance": {"type": "string"}}},
        "Accepted": {"type": "object", "required": ["id", "analyses"], "properties": {
            "id": {"type": "string"}, "status": {"type": "string"},
            "analyses": {"type": "array", "items": {"type": "object"}},
            "rejected": {"type": "array", "items": {"type": "object"}}}},
        "AnalysisSummary": _ANALYSIS_SUMMARY,
        "Analysis": {"allOf": [{"$ref": "#/components/schemas/AnalysisSummary"}, {
            "type": "object", "properties": {
                "findings": {"type": "object", "nullable": True,
                             "description": "Counts, blast percentage, cells with boxes and probabilities"},
                "fhir_bundle": {"type": "object", "nullable": True},
                "deliveries": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}},
            }}]},
        "AnalysisList": {"type": "object", "properties": {
            "analyses": {"type": "array", "items": {"$ref": "#/components/schemas/AnalysisSummary"}},
            "next_before": {"type": "string", "nullable": True},
            "counts": {"type": "object"}}},
        "Delivery": {"type": "object", "properties": {
            "id": {"type": "string"}, "key": {"type": "string"}, "kind": {"type": "string"},
            "state": {"type": "string"}, "attempts": {"type": "integer"},
            "last_error": {"type": "string", "nullable": True}}},
        "DeliveryList": {"type": "object", "properties": {
            "deliveries": {"type": "array", "items": {"$ref": "#/components/schemas/Delivery"}}}},
    },
}


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.0 document served on ``/openapi.json``."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "leuk-fhir",
            "version": __version__,
            "description": (
                "AI screening of blood-smear images for ALL blasts, reported as HL7 FHIR R4. "
                "Decision support only: reports stay preliminary until a clinician signs off. "
                "Errors are RFC 7807 problem details (OperationOutcome on /fhir endpoints)."
            ),
        },
        "security": [{"bearer": []}],
        "paths": PATHS,
        "components": COMPONENTS,
    }
