"""DICOM intake: a real C-STORE association (pynetdicom SCU) and STOW-RS, each instance
becoming an analysis; a full queue answers "out of resources" / 503."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from leuk_fhir.adapters.stow import build_stow_body
from leuk_fhir.adapters.synthetic import dicom_microscopy_dataset
from leuk_fhir.model.synthetic import generate_cell

pytestmark = pytest.mark.slow


def _instance_bytes(seed: int) -> bytes:
    ds = dicom_microscopy_dataset(generate_cell("blast", seed), patient_name="Doe^Jane",
                                  patient_id="PAT-42")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _c_store(port: int, data: bytes) -> int:
    ds = dcmread(io.BytesIO(data))
    ae = AE(ae_title="SCOPE01")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="LEUKFHIR")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def _wait_done(store, analysis_id: str, timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while (record := store.get_analysis(analysis_id)).status in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return record


def test_c_store_instance_is_analysed(make_app, settings) -> None:
    app = make_app(start=True, settings_=settings.replace(dicom__enabled=True, dicom__port=0))
    service = app.extensions["leuk_fhir"]
    assert _c_store(service.dicom_receiver.port, _instance_bytes(3)) == 0x0000
    (record,) = service.store.list_analyses()
    assert record.transport == "c-store"
    assert record.submitted_by == "DICOM AE SCOPE01"
    record = _wait_done(service.store, record.id)
    assert record.status == "completed", record.error_message
    assert record.outcome == "blasts-detected"
    bundle = app.test_client().get(f"/v1/analyses/{record.id}/fhir").get_json()
    types = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert {"DiagnosticReport", "Patient", "ImagingStudy"} <= types


def test_c_store_when_the_queue_is_full_answers_out_of_resources(make_app, settings) -> None:
    app = make_app(start=True, settings_=settings.replace(
        dicom__enabled=True, dicom__port=0, service__queue_size=1))
    service = app.extensions["leuk_fhir"]
    service.queue.reserve()  # the only place is taken
    try:
        assert _c_store(service.dicom_receiver.port, _instance_bytes(4)) == 0xA700
    finally:
        service.queue.release()
    assert service.store.list_analyses() == []


def test_stow_rs(make_app) -> None:
    app = make_app()
    client = app.test_client()
    body, content_type = build_stow_body([_instance_bytes(5), _instance_bytes(6)])
    stored = client.post("/dicomweb/studies", data=body, content_type=content_type)
    assert stored.status_code == 200
    assert stored.mimetype == "application/dicom+json"
    assert len(stored.get_json()["00081199"]["Value"]) == 2
    records = app.extensions["leuk_fhir"].store.list_analyses()
    assert {r.transport for r in records} == {"stow-rs"} and len(records) == 2

    bad_body, bad_type = build_stow_body([b"DICM but not really" * 20])
    refused = client.post("/dicomweb/studies", data=bad_body, content_type=bad_type)
    assert refused.status_code == 409
    assert "00081198" in refused.get_json()
    wrong_type = client.post("/dicomweb/studies", data=b"x", content_type="application/json")
    assert wrong_type.status_code == 415
    assert wrong_type.mimetype == "application/problem+json"
    assert len(app.extensions["leuk_fhir"].store.list_analyses()) == 2


def test_a_study_that_cannot_be_opened_is_kept_as_a_failed_analysis(make_app, settings) -> None:
    """Study mode acknowledges each instance before the study is opened as one acquisition,
    so a study that then fails (here: one Study Instance UID for two patients) cannot be
    refused to the device: it is kept, whole, as a failed analysis that says why."""
    app = make_app(start=True, settings_=settings.replace(
        dicom__enabled=True, dicom__port=0, dicom__analysis_unit="study", dicom__study_idle_s=0.3))
    service = app.extensions["leuk_fhir"]
    first = dicom_microscopy_dataset(generate_cell("blast", 5), patient_id="PAT-1")
    second = dicom_microscopy_dataset(generate_cell("normal", 6), patient_id="PAT-2",
                                      study_uid=first.StudyInstanceUID)
    for ds in (first, second):
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        assert _c_store(service.dicom_receiver.port, out.getvalue()) == 0x0000
    deadline = time.monotonic() + 30
    while not (records := service.store.list_analyses()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (record,) = records
    assert record.status == "failed" and record.transport == "c-store"
    assert "different patients" in (record.error_message or "")
    kept = sorted(p.name for p in Path(record.upload_path).rglob("*") if p.is_file())
    assert len(kept) == 2, kept
    assert service.queue.pending == 0  # the reserved place was given back
    page = app.test_client().get(f"/v1/analyses/{record.id}").get_json()
    assert page["status"] == "failed" and "different patients" in page["error"]["message"]
