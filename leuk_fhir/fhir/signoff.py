"""Follow-up Bundles for a delivered report: a clinician's sign-off and a "blasts detected" alert.

Both are transaction Bundles as idempotent as the report itself: the sign-off is a conditional
update keyed on the report identifier; the alert is a conditional create keyed on an
identifier derived from the report identifier.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from leuk_fhir.errors import FhirMappingError
from leuk_fhir.fhir import codes as C
from leuk_fhir.fhir.rendering import render_html, render_pdf
from leuk_fhir.fhir.report import (
    SIGN_OFF_PENDING,
    ReportBundle,
    TransactionBuilder,
    _attachment,
    _digest,
    _report_content,
    _validated,
    ai_meta,
    fhir_instant,
    identifier,
    match_url,
)
from leuk_fhir.findings import Findings
from leuk_fhir.settings import FhirSettings

_PENDING_PHRASE = "not yet reviewed by a clinician"


def _bundle_of(report: ReportBundle | dict[str, Any]) -> dict[str, Any]:
    bundle = report.bundle if isinstance(report, ReportBundle) else report
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirMappingError("expected a report transaction Bundle (ReportBundle or its .bundle)")
    return bundle


def _entry(bundle: dict[str, Any], resource_type: str) -> dict[str, Any]:
    for e in bundle.get("entry", []):
        if e.get("resource", {}).get("resourceType") == resource_type:
            return e
    raise FhirMappingError(f"the report Bundle has no {resource_type}")


def _first_identifier(resource: dict[str, Any]) -> tuple[str, str]:
    ident = (resource.get("identifier") or [{}])[0]
    if not ident.get("system") or not ident.get("value"):
        raise FhirMappingError(f"{resource['resourceType']} has no identifier system and value")
    return ident["system"], ident["value"]


def build_signoff_bundle(
    report: ReportBundle | dict[str, Any],
    *,
    practitioner_identifier: str,
    practitioner_name: str | None = None,
    practitioner_system: str = C.PRACTITIONER_SYSTEM,
    signed_at: datetime | None = None,
    comment: str | None = None,
    findings: Findings | None = None,
) -> dict[str, Any]:
    """A transaction Bundle that turns the report ``final`` and records who signed it.

    The DiagnosticReport and its Observations become conditional updates
    (``PUT DiagnosticReport?identifier=...``) with status ``final`` and the Practitioner as
    ``resultsInterpreter``; the other resources stay conditional creates (they match what is
    there); a Provenance (activity ``UPDATE``, agent ``attester``) names the Practitioner.
    With ``findings`` the PDF/HTML are re-rendered to show the sign-off.
    """
    if not practitioner_identifier:
        raise FhirMappingError("a sign-off needs the signing practitioner's identifier")
    signed_at = signed_at or datetime.now(UTC)
    when = fhir_instant(signed_at)
    source = copy.deepcopy(_bundle_of(report))
    dr_entry = _entry(source, "DiagnosticReport")
    dr = dr_entry["resource"]
    dr_system, dr_value = _first_identifier(dr)
    who = practitioner_name or practitioner_identifier
    sign_text = f"signed off by {who} on {when}"

    tb = TransactionBuilder()
    practitioner: dict[str, Any] = {
        "resourceType": "Practitioner",
        "identifier": [identifier(practitioner_system, practitioner_identifier)],
        "active": True,
    }
    if practitioner_name:
        practitioner["name"] = [{"text": practitioner_name}]
    practitioner_ref = tb.create(practitioner, practitioner_system, practitioner_identifier)

    observation_refs: list[str] = []
    for e in source["entry"]:
        res = e["resource"]
        rtype = res["resourceType"]
        if rtype == "Provenance":
            tb.entries.append(e)
            continue
        if rtype in ("Observation", "DiagnosticReport"):
            res["status"] = "final"
            if rtype == "DiagnosticReport":
                continue  # added last, below
            observation_refs.append(e["fullUrl"])
            e = {**e, "request": {"method": "PUT", "url": f"{rtype}?{e['request']['ifNoneExist']}"}}
        tb.entries.append(e)

    dr["conclusion"] = dr.get("conclusion", "").replace(_PENDING_PHRASE, sign_text)
    if sign_text not in dr["conclusion"]:
        dr["conclusion"] = f"{dr.get('conclusion', '')} Reviewed and {sign_text}.".strip()
    if comment:
        dr["conclusion"] += f" Reviewer comment: {comment}"
    dr["resultsInterpreter"] = [{"reference": practitioner_ref}]
    if findings is not None:
        content = _report_content(findings, dr_value, dr.get("issued", when), dr["conclusion"],
                                  f"Final: {sign_text}.")
        html = render_html(content)
        forms = [_attachment(html.encode("utf-8"), "text/html", f"AI blood smear report {dr_value}", when)]
        if any(f.get("contentType") == "application/pdf" for f in dr.get("presentedForm", [])):
            forms.insert(0, _attachment(render_pdf(content), "application/pdf",
                                        f"AI blood smear report {dr_value}", when))
        dr["presentedForm"] = forms
    tb.entries.append({
        "fullUrl": dr_entry["fullUrl"],
        "resource": _validated(dr),
        "request": {"method": "PUT", "url": f"DiagnosticReport?{match_url('DiagnosticReport', dr_system, dr_value)}"},
    })
    tb.update({
        "resourceType": "Provenance",
        "id": f"lf-sign-{_digest(dr_value, practitioner_system, practitioner_identifier)}",
        "target": [{"reference": dr_entry["fullUrl"]}, *({"reference": r} for r in observation_refs)],
        "recorded": when,
        "activity": C.concept(C.DATA_OPERATION, "UPDATE", "revise"),
        "reason": [{"text": "Clinician review and sign-off of an AI-generated report"}],
        "agent": [{"type": C.concept(C.PROVENANCE_PARTICIPANT, "attester", "Attester"),
                   "who": {"reference": practitioner_ref, "display": who}}],
    }, f"Provenance/lf-sign-{_digest(dr_value, practitioner_system, practitioner_identifier)}")
    return tb.bundle()


def build_communication_bundle(
    report: ReportBundle | dict[str, Any],
    settings: FhirSettings,
    *,
    recipient: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A transaction Bundle with one ``Communication`` alerting that blasts were detected.

    ``about`` the report and ``subject`` the patient are conditional references
    (``DiagnosticReport?identifier=...``), so the report must already be on the server: enqueue
    it with ``Outbox.enqueue(..., depends_on=<report key>)``. ``recipient`` (default
    ``settings.alert_recipient``) is a reference to a Practitioner or CareTeam; each recipient
    of a report gets its own Communication.
    """
    bundle = _bundle_of(report)
    dr = _entry(bundle, "DiagnosticReport")["resource"]
    dr_system, dr_value = _first_identifier(dr)
    pat_system, pat_value = _first_identifier(_entry(bundle, "Patient")["resource"])
    dev_system, dev_value = _first_identifier(_entry(bundle, "Device")["resource"])
    recipient = recipient if recipient is not None else settings.alert_recipient
    when = fhir_instant(now or datetime.now(UTC))
    # in the site's report identifier system; one alert per recipient of the report
    value = f"{dr_value}.alert" + (f".{_digest(recipient, length=16)}" if recipient else "")
    text = (
        "AI alert: blasts detected in a blood smear. "
        f"{dr.get('conclusion', '')} Review DiagnosticReport {dr_system}|{dr_value}."
    )
    comm: dict[str, Any] = {
        "resourceType": "Communication",
        "meta": ai_meta(),
        "identifier": [identifier(dr_system, value)],
        "status": "completed",
        "category": [C.concept(C.COMMUNICATION_CATEGORY, "alert", "Alert")],
        "priority": "urgent",
        "subject": {"reference": f"Patient?{match_url('Patient', pat_system, pat_value)}"},
        "about": [{"reference": f"DiagnosticReport?{match_url('DiagnosticReport', dr_system, dr_value)}"}],
        "sent": when,
        "sender": {"reference": f"Device?{match_url('Device', dev_system, dev_value)}"},
        "reasonCode": [C.ConclusionCode.ACUTE_LYMPHOID_LEUKEMIA.concept()],
        "payload": [{"contentString": text}],
    }
    if recipient:
        comm["recipient"] = [{"reference": recipient}]
    tb = TransactionBuilder()
    tb.create(comm, dr_system, value)
    return tb.bundle()


__all__ = ["SIGN_OFF_PENDING", "build_communication_bundle", "build_signoff_bundle"]
