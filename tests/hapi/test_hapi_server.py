"""The HAPI FHIR test server behaves like the HAPI FHIR JPA servers leuk-fhir users test against.

Proves, over HTTP on loopback: it is HAPI FHIR speaking R4 with every resource type leuk-fhir
writes; request validation rejects resources that break the base R4 specification with an
OperationOutcome; transactions resolve `urn:uuid` references and honour conditional creates and
updates; identifier search, `$validate` and `$expunge` work; codes the offline server cannot know
(LOINC, SNOMED CT) warn at most; UCUM is checked offline and stays strict, while other terminology is still checked.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
import requests

if TYPE_CHECKING:  # the root conftest is not an importable module at run time
    from tests.conftest import FhirTestNamespace

pytestmark = pytest.mark.hapi

FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
#: Searches must see writes made a moment ago: HAPI reuses search results for 60 s otherwise.
SEARCH_HEADERS = {"Accept": FHIR_JSON, "Cache-Control": "no-cache"}
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RESOURCE_TYPES_WE_WRITE = ("DiagnosticReport", "Observation", "Patient", "Specimen",
                           "ImagingStudy", "Media", "Device", "Provenance", "Communication",
                           "Organization")


def blast_observation(ns: FhirTestNamespace, key: str, **changes: Any) -> dict[str, Any]:
    """A valid R4 Observation: blasts per 100 leukocytes, 12.5 %."""
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [ns.identifier(key)],
        "status": "preliminary",
        "code": {"coding": [{"system": LOINC, "code": "26446-5",
                             "display": "Blasts/100 leukocytes in Blood"}]},
        "effectiveDateTime": "2026-01-15T09:30:00+00:00",
        "valueQuantity": {"value": 12.5, "unit": "%", "system": UCUM, "code": "%"},
    }
    observation.update(changes)
    return observation


def issues(outcome: dict[str, Any], *severities: str) -> list[dict[str, Any]]:
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return [i for i in outcome.get("issue", []) if i["severity"] in severities]


def search(base: str, resource_type: str, **params: str) -> dict[str, Any]:
    response = requests.get(f"{base}/{resource_type}", params=params, headers=SEARCH_HEADERS,
                            timeout=60)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    return bundle


def test_metadata_is_hapi_fhir_r4_serving_our_resource_types(fhir_base: str) -> None:
    response = requests.get(f"{fhir_base}/metadata", headers={"Accept": FHIR_JSON}, timeout=60)
    assert response.status_code == 200
    capabilities = response.json()
    assert capabilities["resourceType"] == "CapabilityStatement"
    assert capabilities["fhirVersion"] == "4.0.1"
    assert "HAPI FHIR" in capabilities["software"]["name"]
    rest = capabilities["rest"][0]
    assert {"code": "transaction"} in rest["interaction"]
    served = {r["type"]: {i["code"] for i in r.get("interaction", [])} for r in rest["resource"]}
    for resource_type in RESOURCE_TYPES_WE_WRITE:
        assert {"create", "update", "read", "search-type"} <= served[resource_type], resource_type


def test_observation_without_status_is_rejected_with_operation_outcome(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    invalid = blast_observation(fhir_namespace, "no-status")
    del invalid["status"]
    response = requests.post(f"{fhir_base}/Observation", json=invalid, headers=HEADERS,
                             timeout=60)
    assert 400 <= response.status_code < 500
    errors = issues(response.json(), "error", "fatal")
    assert any("Observation.status" in e.get("diagnostics", "") for e in errors), errors
    stored = search(fhir_base, "Observation", identifier=fhir_namespace.token("no-status"))
    assert stored["total"] == 0


def test_observation_with_invalid_status_code_is_rejected(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    invalid = blast_observation(fhir_namespace, "bad-status", status="done")
    response = requests.post(f"{fhir_base}/Observation", json=invalid, headers=HEADERS,
                             timeout=60)
    assert 400 <= response.status_code < 500
    assert issues(response.json(), "error", "fatal")


def transaction_bundle(ns: FhirTestNamespace, key: str) -> dict[str, Any]:
    """Patient + Observation, both conditional creates, linked by a `urn:uuid` reference."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    observation_url = f"urn:uuid:{uuid.uuid4()}"
    patient = {"resourceType": "Patient", "identifier": [ns.identifier(f"{key}-patient")],
               "name": [{"family": "Testpatient", "given": ["Ada"]}], "gender": "female"}
    observation = blast_observation(ns, f"{key}-obs", subject={"reference": patient_url})
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_url, "resource": patient,
             "request": {"method": "POST", "url": "Patient",
                         "ifNoneExist": f"identifier={ns.token(key + '-patient')}"}},
            {"fullUrl": observation_url, "resource": observation,
             "request": {"method": "POST", "url": "Observation",
                         "ifNoneExist": f"identifier={ns.token(key + '-obs')}"}},
        ],
    }


def post_transaction(base: str, bundle: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(base, json=bundle, headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    assert reply["type"] == "transaction-response"
    return reply


def test_transaction_conditional_create_creates_once_then_matches(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    first = post_transaction(fhir_base, transaction_bundle(fhir_namespace, "tx"))
    assert [e["response"]["status"][:3] for e in first["entry"]] == ["201", "201"]
    patient_id = first["entry"][0]["response"]["location"].split("/_history")[0]
    observation_id = first["entry"][1]["response"]["location"].split("/_history")[0]
    assert patient_id.startswith("Patient/")

    stored = requests.get(f"{fhir_base}/{observation_id}", headers=HEADERS, timeout=60).json()
    assert stored["subject"]["reference"] == patient_id  # urn:uuid replaced by the server id

    # Same content, fresh urn:uuids, as a retry after a lost response would send it.
    second = post_transaction(fhir_base, transaction_bundle(fhir_namespace, "tx"))
    assert [e["response"]["status"][:3] for e in second["entry"]] == ["200", "200"]
    assert second["entry"][0]["response"]["location"].startswith(patient_id + "/")
    assert second["entry"][1]["response"]["location"].startswith(observation_id + "/")
    patients = search(fhir_base, "Patient", identifier=fhir_namespace.token("tx-patient"))
    assert patients["total"] == 1


def test_transaction_conditional_update_creates_then_updates(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    match = f"Observation?identifier={fhir_namespace.token('cu')}"

    def bundle(value: float) -> dict[str, Any]:
        observation = blast_observation(fhir_namespace, "cu")
        observation["valueQuantity"]["value"] = value
        return {"resourceType": "Bundle", "type": "transaction",
                "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": observation,
                           "request": {"method": "PUT", "url": match}}]}

    created = post_transaction(fhir_base, bundle(12.5))["entry"][0]["response"]
    updated = post_transaction(fhir_base, bundle(31.0))["entry"][0]["response"]
    assert created["status"].startswith("201")
    assert updated["status"].startswith("200")
    assert created["location"].split("/_history")[0] == updated["location"].split("/_history")[0]
    assert updated["location"].endswith("/_history/2")
    found = search(fhir_base, "Observation", identifier=fhir_namespace.token("cu"))
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["valueQuantity"]["value"] == 31.0


def test_search_by_identifier_finds_exactly_the_matching_resource(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    for key in ("search-a", "search-b"):
        response = requests.post(f"{fhir_base}/Observation",
                                 json=blast_observation(fhir_namespace, key), headers=HEADERS,
                                 timeout=60)
        assert response.status_code == 201, response.text
    found = search(fhir_base, "Observation", identifier=fhir_namespace.token("search-b"))
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["identifier"] == [fhir_namespace.identifier("search-b")]
    assert search(fhir_base, "Observation",
                  identifier=fhir_namespace.token("search-c"))["total"] == 0


def validate(base: str, resource: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = requests.post(f"{base}/{resource['resourceType']}/$validate", json=resource,
                             headers=HEADERS, timeout=120)
    return response.status_code, response.json()


def test_validate_passes_a_valid_resource(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    status, outcome = validate(fhir_base, blast_observation(fhir_namespace, "valid"))
    assert status == 200
    assert issues(outcome, "error", "fatal") == []


def test_validate_reports_errors_for_an_invalid_resource(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    invalid = blast_observation(fhir_namespace, "invalid")
    del invalid["status"]
    invalid["valueString"] = "both value[x] types"  # a second choice type: also invalid
    status, outcome = validate(fhir_base, invalid)
    assert status in (200, 400, 412, 422)  # HAPI answers 422; the spec also allows 200
    assert issues(outcome, "error", "fatal")


def test_unknown_loinc_code_is_accepted_with_a_warning_at_most(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    observation = blast_observation(fhir_namespace, "unknown-loinc")
    observation["code"] = {"coding": [{"system": LOINC, "code": "99999-9",
                                       "display": "Not a real LOINC code"}]}
    status, outcome = validate(fhir_base, observation)
    assert status == 200
    assert issues(outcome, "error", "fatal") == []
    assert any(LOINC in i.get("diagnostics", "") for i in issues(outcome, "warning",
                                                                  "information"))
    created = requests.post(f"{fhir_base}/Observation", json=observation, headers=HEADERS,
                            timeout=60)
    assert created.status_code == 201, created.text


def test_snomed_problems_only_warn(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    observation = blast_observation(
        fhir_namespace, "snomed",
        method={"coding": [{"system": "http://snomed.info/sct", "code": "1",
                            "display": "Not a SNOMED CT concept"}]})
    status, outcome = validate(fhir_base, observation)
    assert status == 200
    assert issues(outcome, "error", "fatal") == []
    created = requests.post(f"{fhir_base}/Observation", json=observation, headers=HEADERS,
                            timeout=60)
    assert created.status_code == 201, created.text


def test_invalid_ucum_unit_is_an_error(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    """HAPI checks UCUM offline, so a bad unit must stay an error (no leniency for UCUM)."""
    observation = blast_observation(
        fhir_namespace, "ucum",
        valueQuantity={"value": 1, "unit": "?", "system": UCUM, "code": "not-a-ucum-unit"})
    status, outcome = validate(fhir_base, observation)
    assert status == 422
    assert any("not-a-ucum-unit" in i.get("diagnostics", "")
               for i in issues(outcome, "error", "fatal"))


def test_ai_security_label_is_known_but_other_terminology_is_still_checked(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    label_system = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
    labelled = blast_observation(fhir_namespace, "aiast",
                                 meta={"security": [{"system": label_system, "code": "AIAST"}]})
    created = requests.post(f"{fhir_base}/Observation", json=labelled, headers=HEADERS,
                            timeout=60)
    assert created.status_code == 201, created.text

    bogus = blast_observation(fhir_namespace, "bogus-label",
                              meta={"security": [{"system": label_system, "code": "NOT-A-CODE"}]})
    rejected = requests.post(f"{fhir_base}/Observation", json=bogus, headers=HEADERS, timeout=60)
    assert 400 <= rejected.status_code < 500
    assert any("NOT-A-CODE" in i.get("diagnostics", "")
               for i in issues(rejected.json(), "error"))


def test_expunge_removes_the_namespace_for_good(
        fhir_base: str, fhir_namespace: FhirTestNamespace) -> None:
    created = post_transaction(fhir_base, transaction_bundle(fhir_namespace, "gone"))
    locations = [e["response"]["location"].split("/_history")[0] for e in created["entry"]]

    expunged = fhir_namespace.expunge("Patient", "Observation")  # the Patient delete cascades

    assert set(locations) <= set(expunged)  # with the rest of this module's resources
    for location in locations:
        read = requests.get(f"{fhir_base}/{location}", headers=HEADERS, timeout=60)
        assert read.status_code == 404, (location, read.status_code)  # 410 if only deleted
    assert search(fhir_base, "Patient", identifier=fhir_namespace.token())["total"] == 0
