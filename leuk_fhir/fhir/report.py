"""Findings -> one FHIR R4 transaction Bundle (DiagnosticReport and everything it points at).

Every resource is checked against the ``fhir.resources.R4B`` model before it goes into the
Bundle (only elements that exist identically in R4 are used), so a call that returns has built
valid resources; anything else raises :class:`~leuk_fhir.errors.FhirMappingError`.

Idempotency: every entry is a conditional create keyed on a business identifier
(``request.ifNoneExist``), except Provenance (R4 Provenance has no identifier), which is an
update-as-create with a deterministic, non-numeric id. Identifiers derive from the submission
(the input's ``Acquisition.source_id`` and the patient, :func:`submission_key`) and the model
(``ModelInfo.sha256`` and version), so sending the same report again creates nothing new. See docs/fhir-mapping.md.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from leuk_fhir import __version__
from leuk_fhir.acquisition import Acquisition, PatientInfo, Scope
from leuk_fhir.errors import FhirMappingError
from leuk_fhir.fhir import codes as C
from leuk_fhir.fhir.rendering import (
    ReportContent,
    annotated_image_jpeg,
    render_html,
    render_pdf,
)
from leuk_fhir.findings import CellFinding, Findings, ModelInfo, Outcome
from leuk_fhir.settings import FhirSettings

SIGN_OFF_PENDING = "Preliminary: not yet reviewed or signed off by a clinician."


# --------------------------------------------------------------------------- helpers


def fhir_instant(moment: datetime) -> str:
    """An ``instant``/``dateTime`` with time zone (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat(timespec="seconds")


def _digest(*parts: str, length: int = 32) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:length]


def submission_key(acq: Acquisition) -> str:
    """What one submission is: its input (``Acquisition.source_id``, a DICOM UID or the image's
    sha256) and the patient it is for. The same image sent for two patients is two reports (and
    two Specimens and Media), never one patient's report filed under the other; sent again for
    the same patient it is the same report. Without patient information: the input alone."""
    p = acq.patient
    if p == PatientInfo():
        return acq.source_id
    if p.identifier:
        who: tuple[str, ...] = ("id", p.identifier_system or "", p.identifier)
    else:
        birth = p.birth_date.isoformat() if p.birth_date else ""
        who = ("demographics", p.name or "", birth, p.sex or "")
    return _digest(acq.source_id, *who, length=64)


def report_identifier_for(key: str, model: ModelInfo) -> str:
    """The DiagnosticReport identifier value: stable for the same submission and model.

    Derived from :func:`submission_key` and the model's artifact sha256 and version; prefixed
    with letters so it is never purely numeric.
    """
    return f"lf-{_digest(key, model.sha256, model.version)}"


def _escape_token(text: str) -> str:
    """A FHIR search token part, with backslash, ``|``, ``,`` and ``$`` escaped by a backslash,
    so an identifier such as ``123,456`` matches itself, not ``123`` or ``456``."""
    for char in ("\\", "|", ",", "$"):
        text = text.replace(char, "\\" + char)
    return text


def match_url(resource_type: str, system: str, value: str) -> str:
    """The search part of a conditional create/update: ``identifier=system|value``."""
    token = f"{_escape_token(system)}|{_escape_token(value)}"
    return "identifier=" + quote(token, safe=":/|.-_")


def identifier(system: str, value: str, use: str | None = None) -> dict[str, Any]:
    out = {"system": system, "value": value}
    if use:
        out["use"] = use
    return out


def ai_meta() -> dict[str, Any]:
    """``meta`` with the HL7 AI Transparency ``AIAST`` security label."""
    return {"security": [dict(C.AI_ASSERTED_LABEL)]}


def _validated(resource: dict[str, Any]) -> dict[str, Any]:
    """Check ``resource`` against its ``fhir.resources.R4B`` model; return it unchanged.

    The JSON we emit is our own dict (only elements identical in R4 and R4B are used), so
    validation is the check and serialisation stays byte-for-byte what the builders wrote.
    """
    from fhir.resources.R4B import get_fhir_model_class

    rtype = resource.get("resourceType", "?")
    try:
        get_fhir_model_class(rtype).model_validate(resource)
    except (ValidationError, KeyError, ValueError) as exc:
        raise FhirMappingError(f"invalid FHIR {rtype}: {exc}") from exc
    return resource


class TransactionBuilder:
    """Collects entries of one transaction Bundle with ``urn:uuid`` full URLs.

    Refuses two conditional requests with the same match URL in one Bundle (HAPI can create
    duplicates then; see REFERENCES.md).
    """

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._matches: set[str] = set()

    def _full_url(self, seed: str) -> str:
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'leuk-fhir:' + seed)}"

    def create(self, resource: dict[str, Any], system: str, value: str) -> str:
        """Add a conditional create keyed on ``system|value``; returns the reference."""
        rtype = resource["resourceType"]
        match = match_url(rtype, system, value)
        key = f"{rtype}?{match}"
        if key in self._matches:
            raise FhirMappingError(f"two entries in one Bundle share the match URL {key}")
        self._matches.add(key)
        full_url = self._full_url(key)
        self.entries.append({
            "fullUrl": full_url,
            "resource": _validated(resource),
            "request": {"method": "POST", "url": rtype, "ifNoneExist": match},
        })
        return full_url

    def update(self, resource: dict[str, Any], url: str) -> str:
        """Add a PUT to ``url`` (``Type/id`` or a conditional ``Type?identifier=...``)."""
        if "?" in url:
            if url in self._matches:
                raise FhirMappingError(f"two entries in one Bundle share the match URL {url}")
            self._matches.add(url)
        full_url = self._full_url("PUT " + url)
        self.entries.append({
            "fullUrl": full_url,
            "resource": _validated(resource),
            "request": {"method": "PUT", "url": url},
        })
        return full_url

    def bundle(self) -> dict[str, Any]:
        """The transaction Bundle (entries were validated one by one as they were added)."""
        return {"resourceType": "Bundle", "type": "transaction", "entry": self.entries}


def _attachment(data: bytes, content_type: str, title: str, created: str) -> dict[str, Any]:
    """An ``Attachment`` with inline data; ``hash`` is the base64 SHA-1 as FHIR R4 defines it."""
    return {
        "contentType": content_type,
        "data": base64.b64encode(data).decode("ascii"),
        "title": title,
        "creation": created,
        "size": len(data),
        "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),
    }


def _human_name(name: str) -> dict[str, Any]:
    """A DICOM PN (``Family^Given^Middle``, with ``=``-separated ideographic and phonetic
    groups) or free text as a FHIR HumanName; of a PN, the first group that is not empty."""
    if "=" in name and "^" in name:
        name = next((group for group in name.split("=") if group.strip("^ ")), name)
    if "^" in name:
        parts = name.split("^")
        out: dict[str, Any] = {"text": " ".join(p for p in (*parts[1:3], parts[0]) if p)}
        if parts[0]:
            out["family"] = parts[0]
        given = [p for p in parts[1:3] if p]
        if given:
            out["given"] = given
        return out
    return {"text": name}


_SEX = {"M": "male", "F": "female", "O": "other", "U": "unknown"}


def fhir_gender(sex: str | None) -> str | None:
    """FHIR ``gender`` for DICOM M/F/O/U or a FHIR code; FhirMappingError for anything else."""
    if not sex:
        return None
    s = sex.strip()
    if s.upper() in _SEX:
        return _SEX[s.upper()]
    if s.lower() in ("male", "female", "other", "unknown"):
        return s.lower()
    raise FhirMappingError(f"patient sex {sex!r} is neither DICOM M/F/O nor FHIR gender")


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportBundle:
    """A built report: the transaction Bundle plus its human-readable renderings."""

    bundle: dict[str, Any]
    report_identifier: str
    pdf: bytes | None
    html: str
    report_identifier_system: str = "urn:leuk-fhir:report"
    outcome: Outcome = Outcome.INDETERMINATE

    @property
    def diagnostic_report(self) -> dict[str, Any]:
        return next(
            e["resource"] for e in self.bundle["entry"]
            if e["resource"]["resourceType"] == "DiagnosticReport"
        )


def _cell_summary(findings: Findings) -> str:
    n = findings.classified_count
    pct = findings.blast_percentage
    indet = len(findings.cells) - n
    text = f"{findings.blast_count} of {n} classified white cell(s) look like blasts"
    if pct is not None:
        text += f" ({pct:.1f}%)"
    if indet:
        text += f"; {indet} cell(s) indeterminate"
    return text


def _conclusion(findings: Findings) -> tuple[str, dict[str, Any] | None]:
    m = findings.model
    head = (
        f"AI-generated preliminary result by {m.name} version {m.version}"
        f"{' (DEMO MODEL, not for clinical use)' if m.is_demo else ''}; "
        "not yet reviewed by a clinician. "
    )
    outcome = findings.outcome
    if outcome is Outcome.BLASTS_DETECTED:
        return (
            head + f"Blasts detected: {_cell_summary(findings)}; mean confidence "
            f"{findings.confidence:.2f}. Suggestive of acute lymphoblastic leukaemia; "
            "requires haematologist review.",
            C.ConclusionCode.ACUTE_LYMPHOID_LEUKEMIA.concept(),
        )
    if outcome is Outcome.NO_BLASTS_DETECTED:
        return (
            head + f"No blasts detected: {_cell_summary(findings)}; mean confidence "
            f"{findings.confidence:.2f}.",
            C.ConclusionCode.NO_ABNORMALITY.concept(),
        )
    reasons = sorted({c.indeterminate_reason for c in findings.cells if c.indeterminate_reason})
    why = (
        "no white cell was found in the image" if not findings.cells
        else "no cell could be classified with confidence"
        + (f" ({'; '.join(reasons)})" if reasons else "")
    )
    return head + f"Indeterminate: {why}. No conclusion code is given; review the image.", None


def _performance_lines(model: ModelInfo) -> list[str]:
    if not model.metrics:
        return ["Measured performance: not recorded in the model artifact."]
    return ["Measured performance: " + ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(model.metrics.items())
    )]


def _report_content(
    findings: Findings, report_id: str, issued: str, conclusion: str, sign_off: str
) -> ReportContent:
    acq, model = findings.acquisition, findings.model
    p, s = acq.patient, acq.specimen
    patient = (
        f"Name: {_human_name(p.name)['text'] if p.name else 'not given'}",
        f"Identifier: {p.identifier or 'not given'}",
        f"Birth date: {p.birth_date.isoformat() if p.birth_date else 'not given'}",
        f"Sex: {fhir_gender(p.sex) or 'not given'}",
    )
    specimen = (
        f"Type: {s.type}",
        f"Identifier: {s.identifier or 'not given'}",
        f"Stain: {s.stain or 'not given'}",
        f"Collected: {fhir_instant(s.collected_at) if s.collected_at else 'not given'}",
    )
    source = [f"Scope: {acq.scope.value}", f"Source: {acq.filename or acq.source_id}"]
    if acq.dicom:
        source.append(f"DICOM Study UID: {acq.dicom.study_uid}")
    if acq.acquired_at:
        source.append(f"Acquired: {fhir_instant(acq.acquired_at)}")
    counts = findings.counts
    total = max(1, len(findings.cells))
    results = tuple(
        (
            (model.cell_class(label).display if model.cell_class(label) else label),  # type: ignore[union-attr]
            str(n),
            f"{100.0 * n / total:.1f}%",
        )
        for label, n in sorted(counts.items(), key=lambda kv: -kv[1])
    )
    rows = tuple(
        (
            str(i + 1),
            _class_display(findings, c),
            "-" if c.indeterminate else f"{c.confidence:.2f}",
            ", ".join(str(v) for v in c.box) if c.box else "whole image",
        )
        for i, c in enumerate(findings.cells[:200])
    )
    image, note = annotated_image_jpeg(findings)
    pct = findings.blast_percentage
    return ReportContent(
        title="Blood smear screening for ALL blasts (AI-generated)",
        report_identifier=report_id,
        patient_lines=patient,
        specimen_lines=specimen,
        source_lines=tuple(source),
        conclusion=conclusion,
        results=results,
        cell_rows=rows,
        blast_percentage="not computable" if pct is None else f"{pct:.1f}% of {findings.classified_count} classified cells",
        confidence=f"{findings.confidence:.2f} (mean probability of the assigned class)",
        model_lines=(
            f"Model: {model.name}", f"Version: {model.version}", f"Artifact sha256: {model.sha256}",
            *_performance_lines(model),
            *(["DEMO MODEL: trained for demonstration, not for clinical use."] if model.is_demo else []),
            f"Software: leuk-fhir {__version__}",
        ),
        sign_off=sign_off,
        issued=issued,
        image_jpeg=image,
        image_note=note,
    )


def _class_display(findings: Findings, cell: CellFinding) -> str:
    if cell.indeterminate:
        return "indeterminate" + (f" ({cell.indeterminate_reason})" if cell.indeterminate_reason else "")
    cls = findings.model.cell_class(cell.label)
    return cls.display if cls else cell.label


def _device(model: ModelInfo, card_ref: str | None) -> dict[str, Any]:
    notes = [{"text": line} for line in _performance_lines(model)]
    if model.is_demo:
        notes.append({"text": "Demonstration model: not for clinical use."})
    if card_ref:
        notes.append({"text": f"Model card: DocumentReference identifier {C.MODEL_CARD_SYSTEM}|{model.sha256}"})
    return {
        "resourceType": "Device",
        "identifier": [identifier(C.MODEL_SHA256_SYSTEM, model.sha256)],
        "status": "active",
        "manufacturer": "leuk-fhir",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "modelNumber": model.version,
        "type": C.concept(C.LOCAL_DEVICE_TYPE, "ai-model", "Artificial intelligence model",
                          text="Artificial intelligence software (image classifier)"),
        "version": [
            {"type": {"text": "model version"}, "value": model.version},
            {"type": {"text": "software"}, "value": f"leuk-fhir {__version__}"},
        ],
        "property": [{
            "type": {"text": "artifact sha256"},
            "valueCode": [{"coding": [{"system": C.MODEL_SHA256_SYSTEM, "code": model.sha256}]}],
        }],
        "note": notes,
    }


def _method(model: ModelInfo) -> dict[str, Any]:
    return {
        "coding": [{"system": C.LOCAL_MODEL, "code": model.name, "version": model.version,
                    "display": f"{model.name} {model.version}"}],
        "text": f"AI image classification: {model.name} version {model.version} "
                f"(sha256 {model.sha256[:12]}...)",
    }


def build_report_bundle(
    findings: Findings,
    settings: FhirSettings,
    *,
    now: datetime | None = None,
    include_pdf: bool = True,
) -> ReportBundle:
    """Map ``findings`` to one transaction Bundle (see module docstring).

    ``now`` fixes ``issued`` (default: the current time, UTC). ``include_pdf`` adds the PDF and
    HTML renderings as ``DiagnosticReport.presentedForm``.
    """
    if not isinstance(findings, Findings):
        raise TypeError(f"findings must be Findings, not {type(findings).__name__}")
    now = now or datetime.now(UTC)
    issued = fhir_instant(now)
    acq: Acquisition = findings.acquisition
    model = findings.model
    if not model.sha256 or not model.version:
        raise FhirMappingError("the model has no sha256 or version: cannot identify the report")
    key = submission_key(acq)
    report_id = report_identifier_for(key, model)
    effective = fhir_instant(acq.acquired_at or findings.created_at)
    tb = TransactionBuilder()

    # Patient: matched by identifier, created only when absent.
    p = acq.patient
    if p.identifier:
        pat_system = p.identifier_system or settings.patient_identifier_system
        pat_value = p.identifier
    else:  # an unidentified patient, one per source
        pat_system = settings.patient_identifier_system
        pat_value = f"unidentified-{_digest(key, length=24)}"
    patient: dict[str, Any] = {"resourceType": "Patient",
                               "identifier": [identifier(pat_system, pat_value, "usual")]}
    if p.name:
        patient["name"] = [_human_name(p.name)]
    if p.birth_date:
        patient["birthDate"] = p.birth_date.isoformat()
    if (g := fhir_gender(p.sex)) is not None:
        patient["gender"] = g
    patient_ref = tb.create(patient, pat_system, pat_value)

    organization_ref = tb.create(
        {"resourceType": "Organization", "active": True, "name": settings.organization_name,
         "identifier": [identifier(C.ORGANIZATION_SYSTEM, settings.organization_identifier)]},
        C.ORGANIZATION_SYSTEM, settings.organization_identifier,
    )

    card_ref = None
    if model.model_card_markdown:
        card = model.model_card_markdown.encode("utf-8")
        card_ref = tb.create({
            "resourceType": "DocumentReference",
            "identifier": [identifier(C.MODEL_CARD_SYSTEM, model.sha256)],
            "status": "current",
            "type": C.concept(C.DOCUMENT_TYPE_LOCAL, "model-card", "AI model card"),
            "description": f"Model card of {model.name} {model.version}",
            "content": [{"attachment": _attachment(card, "text/markdown", f"Model card {model.name} {model.version}", issued)}],
        }, C.MODEL_CARD_SYSTEM, model.sha256)
    device_ref = tb.create(_device(model, card_ref), C.MODEL_SHA256_SYSTEM, model.sha256)

    s = acq.specimen
    spec_value = s.identifier or f"sp-{_digest(key, length=24)}"
    specimen: dict[str, Any] = {
        "resourceType": "Specimen",
        "identifier": [identifier(C.SPECIMEN_SYSTEM, spec_value)],
        "status": "available",
        "type": {**C.BLOOD_SPECIMEN, "text": s.type},
        "subject": {"reference": patient_ref},
    }
    if s.collected_at:
        specimen["collection"] = {"collectedDateTime": fhir_instant(s.collected_at)}
    if s.stain:
        specimen["processing"] = [{"description": f"stain: {s.stain}"}]
    specimen_ref = tb.create(specimen, C.SPECIMEN_SYSTEM, spec_value)

    # The input: ImagingStudy for DICOM, Media otherwise.
    imaging_ref = media_ref = None
    if acq.dicom is not None:
        d = acq.dicom
        study_value = f"urn:oid:{d.study_uid}"
        study: dict[str, Any] = {
            "resourceType": "ImagingStudy",
            "identifier": [identifier(C.DICOM_UID, study_value)],
            "status": "available",
            "subject": {"reference": patient_ref},
            "modality": [C.coding(C.DICOM_DCM, d.modality or "SM")],
            "numberOfSeries": 1 if d.series_uid else 0,
            "numberOfInstances": 1 if d.sop_instance_uid else 0,
        }
        if d.accession_number:
            study["identifier"].append({
                "type": C.concept("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN"),
                "value": d.accession_number})
        if acq.acquired_at:
            study["started"] = fhir_instant(acq.acquired_at)
        if d.series_uid:
            series: dict[str, Any] = {"uid": d.series_uid,
                                      "modality": C.coding(C.DICOM_DCM, d.modality or "SM"),
                                      "specimen": [{"reference": specimen_ref}]}
            if d.sop_instance_uid:
                series["instance"] = [{
                    "uid": d.sop_instance_uid,
                    "sopClass": C.coding(C.RFC3986, f"urn:oid:{d.sop_class_uid or '1.2.840.10008.5.1.4.1.1.77.1.2'}"),
                }]
            study["series"] = [series]
        imaging_ref = tb.create(study, C.DICOM_UID, study_value)
        input_ref = imaging_ref
    else:
        media_value = (
            acq.content_sha256 if key == acq.source_id and acq.content_sha256
            else _digest(key, length=64)
        )
        media: dict[str, Any] = {
            "resourceType": "Media",
            "identifier": [identifier(C.MEDIA_SYSTEM, media_value)],
            "status": "completed",
            "type": C.concept(C.MEDIA_TYPE, "image", "Image"),
            "subject": {"reference": patient_ref},
            "content": {"contentType": acq.media_type or "application/octet-stream",
                        "title": acq.filename or f"image {acq.source_id[:16]}"},
            "note": [{"text": f"Blood smear {acq.scope.value} image; source id {acq.source_id}"}],
        }
        if acq.acquired_at:
            media["createdDateTime"] = fhir_instant(acq.acquired_at)
        lv = acq.pixels.levels[0] if acq.pixels.levels else None
        if lv is not None:
            media["width"], media["height"] = lv.width, lv.height
        if acq.pixels.frame_count > 1:
            media["frames"] = acq.pixels.frame_count
        if acq.device.model or acq.device.manufacturer:
            media["deviceName"] = " ".join(x for x in (acq.device.manufacturer, acq.device.model) if x)
        media_ref = tb.create(media, C.MEDIA_SYSTEM, media_value)
        input_ref = media_ref

    common = {
        "meta": ai_meta(),
        "status": "preliminary",
        "category": [C.concept(C.OBSERVATION_CATEGORY, "laboratory", "Laboratory")],
        "subject": {"reference": patient_ref},
        "specimen": {"reference": specimen_ref},
        "effectiveDateTime": effective,
        "issued": issued,
        "performer": [{"reference": organization_ref}],
        "method": _method(model),
        "device": {"reference": device_ref},
        "derivedFrom": [{"reference": input_ref}],
    }
    observation_refs: list[str] = []

    def add_observation(suffix: str, body: dict[str, Any]) -> None:
        value = f"{report_id}.{suffix}"
        obs = {"resourceType": "Observation",
               "identifier": [identifier(C.OBSERVATION_SYSTEM, value)], **common, **body}
        observation_refs.append(tb.create(obs, C.OBSERVATION_SYSTEM, value))

    for i, cell in enumerate(findings.cells[: settings.max_cell_observations]):
        add_observation(f"cell-{i + 1}", _cell_observation(findings, cell, i))

    if acq.scope is not Scope.CELL or len(findings.cells) != 1:
        pct = findings.blast_percentage
        pct_body: dict[str, Any] = {"code": C.ReportCode.BLASTS_PER_100_LEUKOCYTES.concept()}
        if pct is None:
            pct_body["dataAbsentReason"] = C.concept(C.DATA_ABSENT_REASON, "not-performed", "Not Performed")
            pct_body["note"] = [{"text": "No white cell could be classified."}]
        else:
            pct_body["valueQuantity"] = {"value": round(pct, 2), "unit": "%", "system": C.UCUM, "code": "%"}
            pct_body["interpretation"] = [
                C.concept(C.INTERPRETATION, "A", "Abnormal") if findings.blast_count
                else C.concept(C.INTERPRETATION, "N", "Normal")]
        add_observation("blast-percentage", pct_body)
        components = [
            _count_component("cells-classified", "White cells classified", findings.classified_count),
            _count_component("blasts", "Blasts counted", findings.blast_count),
            _count_component("indeterminate", "Indeterminate cells",
                             len(findings.cells) - findings.classified_count),
        ]
        for label, n in sorted(findings.counts.items()):
            if label != "indeterminate":
                cls = model.cell_class(label)
                components.append(_count_component(f"class-{label}", f"Cells classified as {cls.display if cls else label}", n))
        add_observation("cell-counts", {
            "code": C.concept(C.LOCAL_OBSERVATION, "cell-counts", "White cell counts by class",
                              text="White cell counts by class (AI)"),
            "valueQuantity": _count(len(findings.cells)),
            "component": components,
        })

    conclusion, conclusion_code = _conclusion(findings)
    pdf = None
    content = _report_content(findings, report_id, issued, conclusion, SIGN_OFF_PENDING)
    html = render_html(content)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": ai_meta(),
        "identifier": [identifier(settings.identifier_system, report_id, "official")],
        "status": "preliminary",
        "category": [
            C.concept(C.V2_0074, "HM", "Hematology"),
            C.concept(C.V2_0074, "LAB", "Laboratory"),
        ],
        "code": C.ReportCode.SMEAR_MORPHOLOGY_PANEL.concept(),
        "subject": {"reference": patient_ref},
        "specimen": [{"reference": specimen_ref}],
        "effectiveDateTime": effective,
        "issued": issued,
        "performer": [{"reference": organization_ref}],
        "result": [{"reference": r} for r in observation_refs],
        "conclusion": conclusion,
    }
    if imaging_ref:
        report["imagingStudy"] = [{"reference": imaging_ref}]
    if media_ref:
        report["media"] = [{"comment": "analysed image", "link": {"reference": media_ref}}]
    if conclusion_code:
        report["conclusionCode"] = [conclusion_code]
    if include_pdf:
        pdf = render_pdf(content)
        report["presentedForm"] = [
            _attachment(pdf, "application/pdf", f"AI blood smear report {report_id}", issued),
            _attachment(html.encode("utf-8"), "text/html", f"AI blood smear report {report_id}", issued),
        ]
    report_ref = tb.create(report, settings.identifier_system, report_id)

    entities = [{"role": "source", "what": {"reference": input_ref}},
                {"role": "source", "what": {"reference": device_ref}}]
    if card_ref:
        entities.append({"role": "source", "what": {"reference": card_ref}})
    tb.update({
        "resourceType": "Provenance",
        "id": f"lf-prov-{report_id[3:]}",
        "meta": ai_meta(),
        "target": [{"reference": report_ref}, *({"reference": r} for r in observation_refs)],
        "recorded": issued,
        "activity": C.concept(C.DATA_OPERATION, "CREATE", "create"),
        "agent": [
            {"type": C.concept(C.PROVENANCE_PARTICIPANT, "author", "Author"),
             "who": {"reference": device_ref, "display": f"{model.name} {model.version}"}},
            {"type": C.concept(C.PROVENANCE_PARTICIPANT, "custodian", "Custodian"),
             "who": {"reference": organization_ref}},
        ],
        "entity": entities,
    }, f"Provenance/lf-prov-{report_id[3:]}")
    return ReportBundle(
        bundle=tb.bundle(), report_identifier=report_id, pdf=pdf, html=html,
        report_identifier_system=settings.identifier_system, outcome=findings.outcome,
    )


def _count(n: int) -> dict[str, Any]:
    return {"value": n, "unit": "cells", "system": C.UCUM, "code": "{cells}"}


def _count_component(code: str, display: str, n: int) -> dict[str, Any]:
    return {"code": C.concept(C.LOCAL_OBSERVATION, code, display, text=display), "valueQuantity": _count(n)}


def _cell_observation(findings: Findings, cell: CellFinding, index: int) -> dict[str, Any]:
    model = findings.model
    body: dict[str, Any] = {"code": C.ReportCode.BLOOD_SMEAR_FINDING.concept()}
    if cell.indeterminate:
        body["dataAbsentReason"] = C.concept(C.DATA_ABSENT_REASON, "unknown", "Unknown")
        body["note"] = [{"text": "Indeterminate: " + (cell.indeterminate_reason or "out of distribution")}]
    else:
        cls = model.cell_class(cell.label)
        if cls and cls.snomed_code:
            body["valueCodeableConcept"] = C.concept(C.SNOMED, cls.snomed_code, cls.snomed_display, text=cls.display)
        else:
            body["valueCodeableConcept"] = {"text": cls.display if cls else cell.label}
        blast = bool(cls and cls.is_blast)
        body["interpretation"] = [
            C.concept(C.INTERPRETATION, "A", "Abnormal") if blast else C.concept(C.INTERPRETATION, "N", "Normal")]
    components: list[dict[str, Any]] = []
    for label, p in sorted(cell.probabilities.items(), key=lambda kv: -kv[1]):
        cls = model.cell_class(label)
        display = f"Probability: {cls.display if cls else label}"
        components.append({
            "code": C.concept(C.LOCAL_OBSERVATION, f"probability-{label}", display, text=display),
            "valueQuantity": {"value": round(100.0 * float(p), 3), "unit": "%", "system": C.UCUM, "code": "%"},
        })
    if cell.box is not None:
        components.append({
            "code": C.concept(C.LOCAL_OBSERVATION, "bounding-box", "Cell bounding box (x, y, width, height; pixels)"),
            "valueString": ",".join(str(int(v)) for v in cell.box) + (f" frame {cell.frame}" if cell.frame else ""),
        })
    if components:
        body["component"] = components
    return body
