"""The leuk-fhir service: HTTP API, clinician page, DICOM listener and outbox sender."""

from leuk_fhir.service.app import create_app

__all__ = ["create_app"]
