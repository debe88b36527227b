"""FHIR R4 mapping of findings: report Bundle, sign-off, alert, and the human-readable report."""

from leuk_fhir.fhir.report import ReportBundle, build_report_bundle, report_identifier_for
from leuk_fhir.fhir.signoff import build_communication_bundle, build_signoff_bundle

__all__ = [
    "ReportBundle",
    "build_communication_bundle",
    "build_report_bundle",
    "build_signoff_bundle",
    "report_identifier_for",
]
