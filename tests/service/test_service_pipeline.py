"""The service end to end with the real stages: image -> analysis -> findings -> FHIR Bundle ->
outbox, the blast alert (SSE + Communication), clinician sign-off, restart recovery."""

from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from pathlib import Path

import pytest
import requests

from leuk_fhir.acquisition import Transport

from .conftest import wait_for  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow


def submit(client, image: bytes, name: str = "cell.png", **fields: str) -> str:
    response = client.post("/v1/analyses", data={"image": (io.BytesIO(image), name), **fields})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def _entries(bundle: dict, resource_type: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def test_blast_cell_runs_end_to_end_alerts_and_is_signed_off(running_app, live_server, cell_png) -> None:
    app = running_app
    client = app.test_client()
    server = live_server(app)
    events: queue.Queue = queue.Queue()
    stream = requests.get(f"{server.url}/v1/events", stream=True, timeout=30)

    def read() -> None:
        try:
            for line in stream.iter_lines(chunk_size=1, decode_unicode=True):
                if line and line.startswith("data:") and '"outcome"' in line:
                    events.put(json.loads(line[5:]))
        except (requests.RequestException, AttributeError, ValueError):
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    analysis_id = submit(client, cell_png("blast", 7), ordering_practitioner="Practitioner/dr-x")
    body = wait_for(client, analysis_id)
    assert body["status"] == "completed", body["error"]
    findings = body["findings"]
    assert body["outcome"] == findings["outcome"] == "blasts-detected"
    assert body["model"]["is_demo"] is True
    cell = findings["cells"][0]
    assert cell["is_blast"] and 0 < cell["confidence"] <= 1
    assert abs(sum(cell["probabilities"].values()) - 1) < 0.01
    assert len(cell["box"]) == 4
    assert findings["image"]["width"] > 0

    bundle = body["fhir_bundle"]
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    (report,) = _entries(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert body["report"]["status"] == "preliminary"
    assert client.get(body["links"]["fhir"]).mimetype == "application/fhir+json"
    assert client.get(body["links"]["report_pdf"]).data.startswith(b"%PDF")
    assert b"DEMO" in client.get(body["links"]["report_html"]).data.upper()
    assert client.get(body["links"]["image"]).data.startswith(b"\x89PNG")

    # the report and the alert Communication wait in the outbox (no EHR configured here)
    kinds = {d["kind"]: d for d in body["deliveries"]}
    assert set(kinds) == {"report", "communication"}
    outbox = app.extensions["leuk_fhir"].outbox
    communication_bundle = outbox.get_by_key(kinds["communication"]["key"]).bundle
    (communication,) = _entries(communication_bundle, "Communication")
    assert communication["recipient"] == [{"reference": "Practitioner/dr-x"}]
    assert communication["about"][0]["reference"].startswith("DiagnosticReport?")
    assert outbox.get_by_key(kinds["communication"]["key"]).depends_on == kinds["report"]["key"]

    # the page's live stream carried the alert
    deadline = time.monotonic() + 10
    alert = None
    while alert is None and time.monotonic() < deadline:
        data = events.get(timeout=10)
        if data.get("id") == analysis_id and "communication_queued" in data:
            alert = data
    assert alert is not None and alert["communication_queued"] is True
    assert alert["ordering_practitioner"] == "Practitioner/dr-x"

    # a clinician signs off: preliminary -> final, once
    signed = client.post(f"/v1/analyses/{analysis_id}/sign-off",
                         json={"signed_off_by": "Dr Ada Haem", "comment": "Agree; refer."})
    assert signed.status_code == 200, signed.get_json()
    assert signed.get_json()["report"]["status"] == "final"
    assert signed.get_json()["report"]["signed_off_by"] == "Dr Ada Haem"
    again = client.post(f"/v1/analyses/{analysis_id}/sign-off", json={"signed_off_by": "Dr B"})
    assert again.status_code == 409
    detail = client.get(f"/v1/analyses/{analysis_id}").get_json()
    signoff = next(d for d in detail["deliveries"] if d["kind"] == "sign-off")
    final_bundle = outbox.get_by_key(signoff["key"]).bundle
    (final_report,) = _entries(final_bundle, "DiagnosticReport")
    assert final_report["status"] == "final"
    assert "Dr Ada Haem" in json.dumps(final_bundle)
    # the page's report and Bundle now show the sign-off
    assert b"Dr Ada Haem" in client.get(f"/v1/analyses/{analysis_id}/report.html").data
    assert client.get(f"/v1/analyses/{analysis_id}/report.pdf").data.startswith(b"%PDF")
    (shown,) = _entries(client.get(f"/v1/analyses/{analysis_id}/fhir").get_json(), "DiagnosticReport")
    assert shown["status"] == "final"
    deliveries = client.get("/v1/deliveries").get_json()
    assert {d["kind"] for d in deliveries["deliveries"]} >= {"report", "communication", "sign-off"}
    app.extensions["leuk_fhir"].broker.close()  # ends the event stream server-side
    reader.join(5)
    stream.close()


def test_normal_cell_sends_no_alert(running_app, cell_png) -> None:
    client = running_app.test_client()
    body = wait_for(client, submit(client, cell_png("normal", 11)))
    assert body["status"] == "completed", body["error"]
    assert body["outcome"] == "no-blasts-detected"
    assert [d["kind"] for d in body["deliveries"]] == ["report"]


def test_truncated_image_fails_with_a_clear_error(running_app, cell_png) -> None:
    client = running_app.test_client()
    body = wait_for(client, submit(client, cell_png("blast", 1)[:300]))
    assert body["status"] == "failed"
    assert body["error"]["code"] in ("invalid-image", "unsupported-format")
    assert body["error"]["message"]


def test_unfinished_work_survives_a_restart(make_app, cell_png) -> None:
    first = make_app()  # accepts but never starts its workers: a crash right after 202
    client = first.test_client()
    ids = [submit(client, cell_png("normal", seed)) for seed in (21, 22)]
    first.extensions["leuk_fhir"].store.mark_running(ids[1])  # one was mid-analysis
    first.extensions["leuk_fhir"].stop()

    second = make_app(start=True)
    client2 = second.test_client()
    for analysis_id in ids:
        body = wait_for(client2, analysis_id)
        assert body["status"] == "completed", body["error"]
    assert client2.get(f"/v1/analyses/{ids[1]}").get_json()["attempts"] == 2


def test_intake_a_crash_left_uncommitted_is_set_aside_at_start(make_app, cell_png) -> None:
    """An analysis folder without a row (the process died between writing an upload and
    committing it: its sender got no answer) is moved out of the way at start, never deleted;
    committed ones stay. STOW-RS instances of a request never answered are removed."""
    first = make_app(start=True)
    client = first.test_client()
    kept = submit(client, cell_png("normal", 41))
    assert wait_for(client, kept)["status"] == "completed"
    service = first.extensions["leuk_fhir"]
    service.stop()
    orphan = service.analysis_dir("a-never-committed")
    (orphan / "upload").mkdir(parents=True)
    (orphan / "upload" / "cell.png").write_bytes(cell_png("normal", 42))
    unanswered = service.data_dir / "stow-spool" / "1.2.3" / "1.2.3.4.dcm"
    unanswered.parent.mkdir(parents=True)
    unanswered.write_bytes(b"an instance of a STOW-RS request that was never answered")

    second = make_app(start=True)
    assert not orphan.exists() and not unanswered.exists()
    aside = service.data_dir / "uncommitted" / "a-never-committed" / "upload" / "cell.png"
    assert aside.read_bytes() == cell_png("normal", 42)
    assert second.extensions["leuk_fhir"].analysis_dir(kept).is_dir()
    assert second.test_client().get(f"/v1/analyses/{kept}").get_json()["status"] == "completed"


def test_a_file_handed_over_stays_at_its_source_until_its_analysis_is_committed(
    make_app, cell_png, tmp_path, monkeypatch
) -> None:
    """``submit_file`` (C-STORE, STOW-RS) links the file in and removes the source only once
    the analysis row is committed. The failure in between is a FAKE (the row insert raises,
    standing in for the process dying at that moment, which cannot be timed from outside)."""
    service = make_app().extensions["leuk_fhir"]
    source = tmp_path / "spool" / "cell.png"
    source.parent.mkdir()
    source.write_bytes(cell_png("blast", 43))

    def dies(*args, **kwargs):
        raise RuntimeError("the process died here")

    monkeypatch.setattr(service.store, "insert_analysis", dies)
    with pytest.raises(RuntimeError):
        service.submit_file(source, transport=Transport.STOW_RS, media_type="image/png",
                            filename="cell.png")
    assert source.read_bytes() == cell_png("blast", 43)
    assert not any((service.data_dir / "analyses").iterdir())
    monkeypatch.undo()
    record = service.submit_file(source, transport=Transport.STOW_RS, media_type="image/png",
                                 filename="cell.png")
    assert not source.exists() and Path(record.upload_path).read_bytes() == cell_png("blast", 43)


def test_a_sign_off_interrupted_by_a_crash_can_be_done_again(make_app, cell_png) -> None:
    """The process died between claiming a sign-off and recording it: after the restart the
    report is preliminary again (not "being signed off" for ever) and can be signed off."""
    first = make_app(start=True)
    client = first.test_client()
    analysis_id = submit(client, cell_png("blast", 31))
    assert wait_for(client, analysis_id)["status"] == "completed"
    first.extensions["leuk_fhir"].store.claim_sign_off(analysis_id)  # then the crash
    answer = client.post(f"/v1/analyses/{analysis_id}/sign-off", json={"signed_off_by": "Dr B"})
    assert answer.status_code == 409 and "being signed off" in answer.get_json()["detail"]
    first.extensions["leuk_fhir"].stop()

    second = make_app(start=True)
    client2 = second.test_client()
    assert client2.get(f"/v1/analyses/{analysis_id}").get_json()["report"]["status"] == "preliminary"
    answer = client2.post(f"/v1/analyses/{analysis_id}/sign-off", json={"signed_off_by": "Dr B"})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["report"]["status"] == "final"


def test_logs_carry_no_patient_data(running_app, cell_png, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = running_app.test_client()
    analysis_id = submit(client, cell_png("blast", 5), name="DOE^JANE 1970-01-01.png",
                         patient_name="DOE^JANE", patient_identifier="MRN-998877",
                         patient_birth_date="1970-01-01")
    body = wait_for(client, analysis_id)
    assert body["status"] == "completed", body["error"]
    client.post(f"/v1/analyses/{analysis_id}/sign-off", json={"signed_off_by": "Dr Ada Haem"})
    text = caplog.text
    assert analysis_id in text
    for secret in ("DOE", "JANE", "MRN-998877", "1970-01-01"):
        assert secret not in text
