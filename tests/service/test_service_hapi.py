"""The service delivering to the real HAPI FHIR server: report, blast alert, sign-off."""

from __future__ import annotations

import io
import time

import pytest
import requests

pytestmark = [pytest.mark.hapi, pytest.mark.slow]

FHIR_JSON = "application/fhir+json"


def _search(base: str, resource_type: str, **params: str) -> list[dict]:
    bundle = requests.get(f"{base}/{resource_type}", params={**params, "_count": "50"},
                          headers={"Accept": FHIR_JSON, "Cache-Control": "no-cache"}, timeout=60).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def _wait_delivered(client, analysis_id: str, kinds: set[str], timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/analyses/{analysis_id}").get_json()
        states = {d.get("kind"): d["state"] for d in body.get("deliveries", [])}
        if kinds <= set(states) and all(states[k] == "delivered" for k in kinds):
            return body
        assert "dead" not in states.values(), body["deliveries"]
        time.sleep(0.5)
    raise AssertionError(f"not delivered in {timeout_s}s: {body.get('deliveries')}")


def test_report_alert_and_sign_off_reach_hapi(make_app, settings, fhir_base, fhir_namespace, cell_png) -> None:
    practitioner = requests.post(
        f"{fhir_base}/Practitioner",
        json={"resourceType": "Practitioner", "identifier": [fhir_namespace.identifier("dr-x")],
              "name": [{"family": "Haem", "given": ["Ada"]}]},
        headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=60)
    assert practitioner.status_code == 201, practitioner.text
    practitioner_ref = f"Practitioner/{practitioner.json()['id']}"
    app = make_app(start=True, settings_=settings.replace(
        fhir__base_url=fhir_base,
        fhir__identifier_system=fhir_namespace.system,
        fhir__patient_identifier_system=fhir_namespace.system + ":patient",
        outbox__poll_interval_s=0.2,
    ))
    client = app.test_client()
    accepted = client.post("/v1/analyses", data={
        "image": (io.BytesIO(cell_png("blast", 31)), "cell.png"),
        "ordering_practitioner": practitioner_ref})
    assert accepted.status_code == 202
    analysis_id = accepted.get_json()["id"]
    body = _wait_delivered(client, analysis_id, {"report", "communication"})
    assert body["outcome"] == "blasts-detected"
    identifier = body["report"]["identifier"]

    (report,) = _search(fhir_base, "DiagnosticReport", identifier=f"{fhir_namespace.system}|{identifier}")
    assert report["status"] == "preliminary"
    communications = _search(fhir_base, "Communication", recipient=practitioner_ref)
    assert len(communications) == 1
    assert communications[0]["about"][0]["reference"] == f"DiagnosticReport/{report['id']}"

    signed = client.post(f"/v1/analyses/{analysis_id}/sign-off", json={"signed_off_by": "Dr Ada Haem"})
    assert signed.status_code == 200
    _wait_delivered(client, analysis_id, {"report", "communication", "sign-off"})
    final = requests.get(f"{fhir_base}/DiagnosticReport/{report['id']}",
                         headers={"Accept": FHIR_JSON}, timeout=60).json()
    assert final["status"] == "final"
    assert final["resultsInterpreter"][0]["reference"].startswith("Practitioner/")
