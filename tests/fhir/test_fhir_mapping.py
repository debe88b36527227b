"""Findings -> FHIR Bundle: shape, codes, identifiers, idempotency keys, AI labelling."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from leuk_fhir.acquisition import PatientInfo, Scope, SpecimenInfo
from leuk_fhir.errors import FhirMappingError
from leuk_fhir.fhir import build_communication_bundle, build_report_bundle, build_signoff_bundle
from leuk_fhir.fhir.report import match_url, report_identifier_for, submission_key

from .conftest import make_findings  # type: ignore[import-not-found]

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def resources(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_field_report_has_every_resource_and_is_ai_labelled(fhir_settings):
    rb = build_report_bundle(make_findings(), fhir_settings, now=NOW)
    b = rb.bundle
    assert b["type"] == "transaction"
    types = [e["resource"]["resourceType"] for e in b["entry"]]
    for t in ("Patient", "Organization", "Device", "DocumentReference", "Specimen", "Media",
              "Observation", "DiagnosticReport", "Provenance"):
        assert t in types
    assert "ImagingStudy" not in types
    dr = rb.diagnostic_report
    assert dr["status"] == "preliminary"
    assert dr["identifier"][0] == {"use": "official", "system": "urn:leuk-fhir:report", "value": rb.report_identifier}
    assert {c["coding"][0]["code"] for c in dr["category"]} == {"HM", "LAB"}
    assert dr["code"]["coding"][0] == {"system": "http://loinc.org", "code": "34994-4",
                                       "display": "Smear morphology panel - Blood"}
    assert re.search(r"[+-]\d\d:\d\d$|Z$", dr["issued"]), "issued needs a time zone"
    assert "AI-generated" in dr["conclusion"] and "leuk-hosvd-test" in dr["conclusion"]
    assert dr["conclusionCode"][0]["coding"][0]["code"] == "91857003"
    assert len(dr["result"]) == 5  # 3 cells + blast percentage + counts
    assert dr["media"][0]["link"]["reference"].startswith("urn:uuid:")
    forms = {f["contentType"]: f for f in dr["presentedForm"]}
    assert set(forms) == {"application/pdf", "text/html"}
    assert forms["application/pdf"]["hash"] and forms["application/pdf"]["creation"]
    for rtype in ("DiagnosticReport", "Observation", "Provenance"):
        for r in resources(b, rtype):
            assert r["meta"]["security"][0]["code"] == "AIAST", rtype
    # references are urn:uuid and resolve inside the Bundle
    full_urls = {e["fullUrl"] for e in b["entry"]}
    assert all(u.startswith("urn:uuid:") for u in full_urls)
    refs = re.findall(r'"reference": "([^"]+)"', __import__("json").dumps(b))
    assert refs and all(r in full_urls for r in refs)


def test_observations_carry_probability_percentage_method_device(fhir_settings):
    rb = build_report_bundle(make_findings(labels=("blast", "blast", "neutrophil")), fhir_settings, now=NOW)
    obs = resources(rb.bundle, "Observation")
    pct = next(o for o in obs if o["code"]["coding"][0]["code"] == "26446-5")
    assert pct["valueQuantity"] == {"value": 66.67, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}
    assert pct["interpretation"][0]["coding"][0]["code"] == "A"
    cell = next(o for o in obs if o["code"]["coding"][0]["code"] == "5909-7")
    assert cell["valueCodeableConcept"]["coding"][0] == {
        "system": "http://snomed.info/sct", "code": "15433008", "display": "Lymphoblast"}
    probs = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in cell["component"]
             if c["code"]["coding"][0]["code"].startswith("probability-")}
    assert probs["probability-blast"] == 90.0
    assert "leuk-hosvd-test" in cell["method"]["text"] and cell["device"]["reference"].startswith("urn:uuid:")
    assert cell["derivedFrom"][0]["reference"]
    counts = next(o for o in obs if o["code"]["coding"][0]["code"] == "cell-counts")
    by_code = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in counts["component"]}
    assert by_code["blasts"] == 2 and by_code["cells-classified"] == 3
    device = resources(rb.bundle, "Device")[0]
    assert device["version"][0]["value"] == "1.0.0"
    assert device["identifier"][0]["system"] == "urn:leuk-fhir:model-sha256"


def test_identifiers_are_stable_and_change_with_the_model(fhir_settings):
    a = build_report_bundle(make_findings(), fhir_settings, now=NOW, include_pdf=False)
    b = build_report_bundle(make_findings(), fhir_settings, now=NOW, include_pdf=False)
    c = build_report_bundle(make_findings(version="2.0.0"), fhir_settings, now=NOW, include_pdf=False)
    assert a.bundle == b.bundle
    assert a.report_identifier != c.report_identifier
    f = make_findings()
    assert a.report_identifier == report_identifier_for(submission_key(f.acquisition), f.model)


def _for_patient(findings, **patient):
    import dataclasses

    acq = dataclasses.replace(findings.acquisition, patient=PatientInfo(**patient),
                              specimen=SpecimenInfo())
    return dataclasses.replace(findings, acquisition=acq)


def test_the_same_image_for_two_patients_is_two_reports(fhir_settings):
    """A lab resends a file with a corrected MRN, or two patients' orders carry the same file:
    nothing of one patient's report may be filed under, or matched to, the other's."""
    base = make_findings(patient_id=None)
    alice = _for_patient(base, identifier="MRN-AAA", name="Alice")
    bob = _for_patient(base, identifier="MRN-BBB", name="Bob")
    again = _for_patient(base, identifier="MRN-AAA", name="Alice")
    nameless = [_for_patient(base, name=n, sex="F") for n in ("Ann^A", "Eve^E")]
    built = [build_report_bundle(f, fhir_settings, now=NOW, include_pdf=False)
             for f in (alice, bob, again, *nameless)]
    ids = [b.report_identifier for b in built]
    assert ids[0] == ids[2] and len(set(ids)) == 4

    def match(bundle, rtype):
        return next(e["request"]["ifNoneExist"] for e in bundle["entry"]
                    if e["resource"]["resourceType"] == rtype)

    for rtype in ("Patient", "Specimen", "Media", "DiagnosticReport"):
        assert match(built[0].bundle, rtype) != match(built[1].bundle, rtype), rtype
        assert match(built[3].bundle, rtype) != match(built[4].bundle, rtype), rtype
        assert match(built[0].bundle, rtype) == match(built[2].bundle, rtype), rtype


def test_match_urls_escape_search_separators():
    """``123,456`` must match that identifier, not "123 or 456" (FHIR search escaping)."""
    assert match_url("Patient", "urn:mrn", "123,456") == "identifier=urn:mrn|123%5C%2C456"
    assert match_url("Patient", "urn:mrn", "a|b$c\\d") == "identifier=urn:mrn|a%5C|b%5C%24c%5C%5Cd"
    assert match_url("Patient", "urn:mrn", "MRN-0001") == "identifier=urn:mrn|MRN-0001"


def test_one_request_per_match_url_and_no_numeric_ids(fhir_settings):
    rb = build_report_bundle(make_findings(labels=("blast",) * 3), fhir_settings, now=NOW)
    matches = [f'{e["request"]["url"]}?{e["request"].get("ifNoneExist", "")}' for e in rb.bundle["entry"]]
    assert len(matches) == len(set(matches))
    for e in rb.bundle["entry"]:
        rid = e["resource"].get("id")
        assert rid is None or not rid.isdigit()
        if e["request"]["method"] == "POST":
            assert e["request"]["ifNoneExist"].startswith("identifier=")


def test_dicom_input_gives_imaging_study(fhir_settings):
    rb = build_report_bundle(make_findings(dicom=True), fhir_settings, now=NOW, include_pdf=False)
    study = resources(rb.bundle, "ImagingStudy")[0]
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.1"}
    assert study["series"][0]["instance"][0]["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.77.1.2"
    assert not resources(rb.bundle, "Media")
    assert rb.diagnostic_report["imagingStudy"]


def test_indeterminate_has_no_conclusion_code_and_says_why(fhir_settings):
    rb = build_report_bundle(make_findings(labels=("indeterminate",)), fhir_settings, now=NOW, include_pdf=False)
    dr = rb.diagnostic_report
    assert "conclusionCode" not in dr
    assert "Indeterminate" in dr["conclusion"] and "residual above threshold" in dr["conclusion"]
    pct = next(o for o in resources(rb.bundle, "Observation") if o["code"]["coding"][0]["code"] == "26446-5")
    assert pct["dataAbsentReason"]["coding"][0]["code"] == "not-performed"


def test_no_blasts_gives_no_abnormality_code(fhir_settings):
    rb = build_report_bundle(make_findings(labels=("lymphocyte",), scope=Scope.CELL), fhir_settings, now=NOW,
                             include_pdf=False)
    assert rb.diagnostic_report["conclusionCode"][0]["coding"][0]["code"] == "281900007"
    assert len(rb.diagnostic_report["result"]) == 1  # one per-image classification


def test_unidentified_patient_gets_a_source_derived_identifier(fhir_settings):
    rb = build_report_bundle(make_findings(patient_id=None), fhir_settings, now=NOW, include_pdf=False)
    pat = resources(rb.bundle, "Patient")[0]
    assert pat["identifier"][0]["value"].startswith("unidentified-")


def test_bad_input_raises_precise_errors(fhir_settings):
    with pytest.raises(TypeError):
        build_report_bundle({"not": "findings"}, fhir_settings)  # type: ignore[arg-type]
    import dataclasses

    f = make_findings()
    bad_sex = dataclasses.replace(f, acquisition=dataclasses.replace(
        f.acquisition, patient=dataclasses.replace(f.acquisition.patient, sex="X?")))
    with pytest.raises(FhirMappingError, match="sex"):
        build_report_bundle(bad_sex, fhir_settings)
    no_sha = dataclasses.replace(f, model=dataclasses.replace(f.model, sha256=""))
    with pytest.raises(FhirMappingError, match="sha256"):
        build_report_bundle(no_sha, fhir_settings)


def test_signoff_turns_report_final_with_practitioner_provenance(fhir_settings):
    f = make_findings()
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    s = build_signoff_bundle(rb, practitioner_identifier="dr-42", practitioner_name="Dr Ada Smith",
                             signed_at=NOW, findings=f)
    dr_entry = next(e for e in s["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert dr_entry["request"] == {"method": "PUT",
                                   "url": f"DiagnosticReport?identifier=urn:leuk-fhir:report|{rb.report_identifier}"}
    assert dr_entry["resource"]["status"] == "final"
    assert "signed off by Dr Ada Smith" in dr_entry["resource"]["conclusion"]
    assert all(r["status"] == "final" for r in resources(s, "Observation"))
    prov = [p for p in resources(s, "Provenance") if p["agent"][0]["type"]["coding"][0]["code"] == "attester"]
    assert len(prov) == 1 and prov[0]["target"][0]["reference"] == dr_entry["fullUrl"]
    assert resources(s, "Practitioner")[0]["identifier"][0]["value"] == "dr-42"
    with pytest.raises(FhirMappingError):
        build_signoff_bundle(rb, practitioner_identifier="")
    # idempotent: the same sign-off twice is the same Bundle
    assert s == build_signoff_bundle(rb, practitioner_identifier="dr-42", practitioner_name="Dr Ada Smith",
                                     signed_at=NOW, findings=f)


def test_communication_alert_is_about_the_report(fhir_settings):
    rb = build_report_bundle(make_findings(), fhir_settings, now=NOW, include_pdf=False)
    c = build_communication_bundle(rb, fhir_settings, recipient="CareTeam/haem-oncall", now=NOW)
    comm = c["entry"][0]["resource"]
    assert comm["about"][0]["reference"] == f"DiagnosticReport?identifier=urn:leuk-fhir:report|{rb.report_identifier}"
    assert comm["recipient"][0]["reference"] == "CareTeam/haem-oncall"
    assert comm["meta"]["security"][0]["code"] == "AIAST"
    assert "blasts detected" in comm["payload"][0]["contentString"]
    match = c["entry"][0]["request"]["ifNoneExist"]
    assert f"{rb.report_identifier}.alert." in match
    # each recipient gets its own alert; the site default (none here) the plain one
    other = build_communication_bundle(rb, fhir_settings, recipient="Practitioner/7", now=NOW)
    assert other["entry"][0]["request"]["ifNoneExist"] != match
    plain = build_communication_bundle(rb, fhir_settings, now=NOW)
    assert plain["entry"][0]["request"]["ifNoneExist"].endswith(f"{rb.report_identifier}.alert")


def test_hostile_patient_content_still_validates_and_is_kept_exactly(fhir_settings):
    import dataclasses
    from datetime import date

    f = make_findings()
    name = '山田^<b>太郎</b> 🩸 محمد'
    patient = dataclasses.replace(f.acquisition.patient, name=name, birth_date=date(1, 1, 1))
    f = dataclasses.replace(f, acquisition=dataclasses.replace(
        f.acquisition, patient=patient, filename="x" * 500 + "-शर्मा.png"))
    rb = build_report_bundle(f, fhir_settings, now=NOW)  # resources are validated on build
    pat = next(e["resource"] for e in rb.bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    assert pat["birthDate"] == "0001-01-01"
    assert pat["name"][0]["family"] == "山田"
    assert pat["name"][0]["given"] == ["<b>太郎</b> 🩸 محمد"]


def test_dicom_person_names_with_ideographic_groups(fhir_settings):
    """A PN's '=' groups (alphabetic=ideographic=phonetic) are not given names."""
    findings = _for_patient(make_findings(patient_id=None), identifier="JP-1",
                            name="Yamada^Tarou=\u5c71\u7530^\u592a\u90ce=\u3084\u307e\u3060^\u305f\u308d\u3046")
    rb = build_report_bundle(findings, fhir_settings, now=NOW, include_pdf=False)
    (name,) = resources(rb.bundle, "Patient")[0]["name"]
    assert name["family"] == "Yamada" and name["given"] == ["Tarou"]
    only_ideographic = _for_patient(make_findings(patient_id=None), identifier="JP-2",
                                    name="=\u5c71\u7530^\u592a\u90ce")
    rb = build_report_bundle(only_ideographic, fhir_settings, now=NOW, include_pdf=False)
    (name,) = resources(rb.bundle, "Patient")[0]["name"]
    assert name["family"] == "\u5c71\u7530" and name["given"] == ["\u592a\u90ce"]
