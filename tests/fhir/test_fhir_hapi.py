"""Against the real HAPI FHIR server: validation, idempotency, outages, faults, sign-off.

Faults HAPI cannot produce come from :class:`FaultProxy`, a loopback fault injector placed in
front of HAPI that forwards everything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest
import requests

from leuk_fhir.acquisition import Scope
from leuk_fhir.delivery import DeliveryStatus, EhrClient, Outbox, OutboxSender
from leuk_fhir.fhir import build_communication_bundle, build_report_bundle, build_signoff_bundle
from leuk_fhir.settings import FhirSettings, OutboxSettings

from .conftest import make_findings  # type: ignore[import-not-found]
from .fhir_testservers import Fault, FaultProxy, SmartAuthServer  # type: ignore[import-not-found]

pytestmark = pytest.mark.hapi

FAST = OutboxSettings(max_attempts=8, backoff_initial_s=0.05, backoff_max_s=0.5, poll_interval_s=0.05,
                      lease_s=3.0)


def run_settings() -> FhirSettings:
    """Identifier systems unique to this run: searches count only what this test wrote."""
    tag = uuid.uuid4().hex[:10]
    return FhirSettings(identifier_system=f"urn:leuk-fhir:report:{tag}",
                        patient_identifier_system=f"urn:leuk-fhir:patient:{tag}",
                        organization_name="Test Haematology Lab")


def findings_for(i: int, tag: str, **kw):
    return make_findings(seed=i % 5, source_id=f"{tag}-{i}", **kw)


def small_report(i: int, tag: str, settings: FhirSettings) -> dict:
    """A single-cell report (8 entries): the 200-report tests measure delivery, not HAPI's validator."""
    f = make_findings(seed=i % 5, source_id=f"{tag}-{i}", labels=("blast",), scope=Scope.CELL, card=False)
    return build_report_bundle(f, settings, include_pdf=False).bundle


def count(client: EhrClient, rtype: str, identifier: str) -> int:
    return int(client.search(rtype, {"identifier": identifier, "_summary": "count"})["total"])


def errors_of(outcome: dict) -> list[str]:
    return [f"{i.get('severity')}: {i.get('diagnostics')} @ {i.get('location') or i.get('expression')}"
            for i in outcome.get("issue", []) if i.get("severity") in ("error", "fatal")]


@pytest.fixture
def client(hapi_base):
    c = EhrClient(hapi_base, timeout_s=60)
    yield c
    c.close()


def test_every_emitted_resource_validates(client):
    s = run_settings()
    tag = uuid.uuid4().hex
    field = build_report_bundle(findings_for(0, tag), s)
    dicom = build_report_bundle(findings_for(1, tag, dicom=True, labels=("indeterminate", "lymphocyte")), s)
    signoff = build_signoff_bundle(field, practitioner_identifier="dr-1", practitioner_name="Dr One")
    alert = build_communication_bundle(field, s, recipient=None)
    seen: dict[str, int] = {}
    problems = []
    for bundle in (field.bundle, dicom.bundle, signoff, alert):
        for e in bundle["entry"]:
            res = e["resource"]
            seen[res["resourceType"]] = seen.get(res["resourceType"], 0) + 1
            outcome = client.validate(res)
            problems += [f"{res['resourceType']}: {p}" for p in errors_of(outcome)]
    assert set(seen) >= {"Patient", "Organization", "Device", "DocumentReference", "Specimen", "Media",
                         "ImagingStudy", "Observation", "DiagnosticReport", "Provenance", "Practitioner",
                         "Communication"}
    assert not problems, "\n".join(problems)


def test_report_is_accepted_once_and_readable(client):
    s = run_settings()
    rb = build_report_bundle(findings_for(0, uuid.uuid4().hex), s)
    result = client.post_transaction(rb.bundle)
    assert result.created == len(rb.bundle["entry"]) - 2 or result.created >= 8  # shared Org/Device may exist
    ident = f"{s.identifier_system}|{rb.report_identifier}"
    found = client.search("DiagnosticReport", {"identifier": ident})
    assert found["total"] == 1
    dr = found["entry"][0]["resource"]
    assert dr["status"] == "preliminary"
    assert dr["meta"]["security"][0]["code"] == "AIAST"
    assert {f["contentType"] for f in dr["presentedForm"]} == {"application/pdf", "text/html"}
    assert all(r["reference"].startswith("Observation/") for r in dr["result"])
    obs = client.read(dr["result"][0]["reference"])
    assert obs["device"]["reference"].startswith("Device/")
    again = client.post_transaction(rb.bundle)
    assert again.created == 0, again.entry_statuses


def test_identifiers_with_search_separators_match_only_themselves(client):
    """A patient identifier holding a comma (and a bar) is escaped in ``ifNoneExist``: HAPI
    must match that identifier, not "123 or 456", and resending creates nothing."""
    s = run_settings()
    tag = uuid.uuid4().hex
    rb = build_report_bundle(findings_for(0, tag, patient_id=f"{tag[:6]},4|5", card=False), s,
                             include_pdf=False)
    first = client.post_transaction(rb.bundle)
    assert first.created >= 8, first.entry_statuses
    again = client.post_transaction(rb.bundle)
    assert again.created == 0, again.entry_statuses
    found = client.search("Patient", {"identifier": f"{s.patient_identifier_system}|{tag[:6]}\\,4\\|5"})
    assert found["total"] == 1


def test_idempotent_three_pushes_one_after_a_client_timeout(hapi_base, client, tmp_path):
    s = run_settings()
    rb = build_report_bundle(findings_for(0, uuid.uuid4().hex), s)
    proxy = FaultProxy(hapi_base).start()
    try:
        impatient = EhrClient(proxy.base_url, timeout_s=3)
        impatient.capabilities()
        proxy.inject(Fault("slow", delay_s=6))  # HAPI processes it; the answer comes too late
        with Outbox(tmp_path / "o.sqlite") as ob:
            did = ob.enqueue(rb.report_identifier, rb.bundle)
            sender = OutboxSender(ob, impatient, FAST)
            d = sender.send_one()
            assert d is not None and d.status is DeliveryStatus.PENDING and "timed out" in (d.last_error or "")
            sender.drain(timeout_s=60)
            assert ob.get(did).status is DeliveryStatus.DELIVERED
        client.post_transaction(rb.bundle)  # third push
        assert proxy.log.forwarded_transactions == 2
    finally:
        proxy.stop()
    ident = f"{s.identifier_system}|{rb.report_identifier}"
    assert count(client, "DiagnosticReport", ident) == 1
    assert count(client, "Observation", f"urn:leuk-fhir:observation-id|{rb.report_identifier}.cell-1") == 1
    pat = rb.bundle["entry"][0]["resource"]["identifier"][0]
    assert count(client, "Patient", f"{pat['system']}|{pat['value']}") == 1


def test_bad_answers_lose_nothing_and_duplicate_nothing(hapi_base, client, tmp_path, rsa_pair):
    """HTML page, truncated JSON after HAPI stored it, 500, dropped connection, 401 + new token."""
    private_pem, jwks = rsa_pair
    auth_server = SmartAuthServer("leuk-fhir-backend", jwks).start()
    proxy = FaultProxy(hapi_base, token_check=auth_server.check,
                       smart_configuration={"token_endpoint": auth_server.token_url}).start()
    s = run_settings()
    tag = uuid.uuid4().hex
    reports = [build_report_bundle(findings_for(i, tag), s, include_pdf=False) for i in range(5)]
    try:
        from leuk_fhir.delivery import SmartBackendAuth

        auth = SmartBackendAuth(client_id="leuk-fhir-backend", private_key_pem=private_pem, key_id="k1",
                                scope="system/*.c", fhir_base_url=proxy.base_url)
        ehr = EhrClient(proxy.base_url, auth, timeout_s=20)
        proxy.inject(Fault("html-502"), Fault("truncated"), Fault("status", 500), Fault("drop"))
        with Outbox(tmp_path / "o.sqlite") as ob:
            for rb in reports:
                ob.enqueue(rb.report_identifier, rb.bundle)
            sender = OutboxSender(ob, ehr, FAST)
            sender.send_one()
            sender.send_one()
            auth_server.revoke_all()  # the next request answers 401: a fresh token is fetched
            stats = sender.drain(timeout_s=120)
            assert stats["delivered"] == 5 and stats["dead"] == 0, stats
        assert proxy.log.faults_applied == ["html-502", "truncated", "status", "drop"]
        assert auth.tokens_fetched == 2
    finally:
        proxy.stop()
        auth_server.stop()
    for rb in reports:
        assert count(client, "DiagnosticReport", f"{s.identifier_system}|{rb.report_identifier}") == 1


def test_conditional_conflict_412_goes_to_dead_letters_and_can_be_resubmitted(hapi_base, client, tmp_path):
    s = run_settings()
    rb = build_report_bundle(findings_for(0, uuid.uuid4().hex), s, include_pdf=False)
    pat = rb.bundle["entry"][0]["resource"]
    ids = []
    for _ in range(2):  # two Patients with one identifier: the conditional create cannot choose
        r = requests.post(f"{hapi_base}/Patient", json={"resourceType": "Patient", "identifier": pat["identifier"]},
                          headers={"Content-Type": "application/fhir+json"}, timeout=30)
        assert r.status_code == 201
        ids.append(r.headers["Location"].split("/_history")[0].split("/fhir/")[-1])
    with Outbox(tmp_path / "o.sqlite") as ob:
        did = ob.enqueue(rb.report_identifier, rb.bundle)
        sender = OutboxSender(ob, client, FAST)
        d = sender.send_one()
        assert d is not None and d.status is DeliveryStatus.DEAD and d.last_status == 412
        assert d.operation_outcome and d.operation_outcome["resourceType"] == "OperationOutcome"
        # the integrator merges the duplicate patient, then resubmits the dead letter
        assert requests.delete(f"{hapi_base}/{ids[1]}", timeout=30).status_code in (200, 204)
        ob.retry(did)
        sender.drain(timeout_s=60)
        assert ob.get(did).status is DeliveryStatus.DELIVERED
    assert count(client, "DiagnosticReport", f"{s.identifier_system}|{rb.report_identifier}") == 1


@pytest.mark.slow
def test_outage_200_reports_queue_then_arrive_exactly_once(hapi_base, client, tmp_path):
    s = run_settings()
    tag = uuid.uuid4().hex
    proxy = FaultProxy(hapi_base)  # not started: nothing listens on its port
    with Outbox(tmp_path / "o.sqlite") as ob:
        for i in range(200):
            ob.enqueue(f"{tag}-{i}", small_report(i, tag, s))
        sender = OutboxSender(ob, EhrClient(proxy.base_url, timeout_s=30), FAST)
        sender.run_once(max_items=20)
        stats = ob.stats()
        assert stats["pending"] == 200 and stats["delivered"] == 0
        assert "unreachable" in (ob.list("pending", limit=1000)[-1].last_error or "")
        proxy.start()  # the EHR is back
        try:
            for d in ob.list("pending", limit=1000):
                ob.retry(d.id)  # skip the back-off wait
            stats = sender.drain(timeout_s=400)
        finally:
            proxy.stop()
        assert stats["delivered"] == 200, stats
    total = client.search("DiagnosticReport", {"identifier": f"{s.identifier_system}|", "_summary": "count"})
    assert total["total"] == 200


@pytest.mark.slow
def test_sigkill_mid_drain_resumes_and_sends_each_once(hapi_base, client, tmp_path):
    s = run_settings()
    tag = uuid.uuid4().hex
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        for i in range(200):
            ob.enqueue(f"{tag}-{i}", small_report(i, tag, s))
    cmd = [sys.executable, "-m", "leuk_fhir", "outbox", "drain", "--outbox", str(path),
           "--fhir-base", hapi_base, "--lease", "2"]
    env = {**os.environ, "LEUK_FHIR_OUTBOX_BACKOFF_INITIAL_S": "0.05", "LEUK_FHIR_OUTBOX_POLL_INTERVAL_S": "0.05"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with Outbox(path) as ob:
            deadline = time.time() + 300
            while ob.stats()["delivered"] < 30 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            stats = ob.stats()
            assert 30 <= stats["delivered"] < 200, stats
            killed_at = stats["delivered"]
            sender = OutboxSender(ob, EhrClient(hapi_base, timeout_s=60), FAST)
            stats = sender.drain(timeout_s=400)
            assert stats["delivered"] == 200, stats
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at < 200
    total = client.search("DiagnosticReport", {"identifier": f"{s.identifier_system}|", "_summary": "count"})
    assert total["total"] == 200


def test_signoff_and_alert_on_hapi(client, tmp_path):
    s = run_settings()
    f = findings_for(0, uuid.uuid4().hex)
    rb = build_report_bundle(f, s, include_pdf=False)
    with Outbox(tmp_path / "o.sqlite") as ob:
        key = f"{rb.report_identifier}/report"
        ob.enqueue(f"{rb.report_identifier}/communication", build_communication_bundle(rb, s), "communication",
                   depends_on=key)
        ob.enqueue(key, rb.bundle)
        signoff = build_signoff_bundle(rb, practitioner_identifier=f"dr-{uuid.uuid4().hex[:6]}",
                                       practitioner_name="Dr Ada Smith",
                                       signed_at=datetime(2026, 11, 22, 8, 0, tzinfo=UTC))
        ob.enqueue(f"{rb.report_identifier}/sign-off", signoff, "sign-off", depends_on=key)
        stats = OutboxSender(ob, client, FAST).drain(timeout_s=120)
        assert stats["delivered"] == 3, [d.as_dict() for d in ob.list()]
    client.post_transaction(signoff)  # signing twice changes nothing
    ident = f"{s.identifier_system}|{rb.report_identifier}"
    found = client.search("DiagnosticReport", {"identifier": ident})
    assert found["total"] == 1
    dr = found["entry"][0]["resource"]
    assert dr["status"] == "final" and "signed off by Dr Ada Smith" in dr["conclusion"]
    assert dr["resultsInterpreter"][0]["reference"].startswith("Practitioner/")
    provs = client.search("Provenance", {"target": f"DiagnosticReport/{dr['id'].split('/')[0]}"})
    agents = sorted(p["resource"]["agent"][0]["type"]["coding"][0]["code"] for p in provs.get("entry", []))
    assert agents == ["attester", "author"]
    obs = client.read(dr["result"][0]["reference"])
    assert obs["status"] == "final"
    comm = client.search("Communication", {"identifier": f"{s.identifier_system}|{rb.report_identifier}.alert"})
    assert comm["total"] == 1
    assert comm["entry"][0]["resource"]["about"][0]["reference"] == f"DiagnosticReport/{dr['id']}"
