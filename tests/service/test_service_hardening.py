"""Hostile and careless clients: what the API refuses at the door, what it never mixes up
(one patient's report filed under another's, a sign-off that did not happen), and the headers
and limits that keep the service answering."""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import date, timedelta

import pytest
from PIL import Image

from leuk_fhir.errors import ConflictError
from leuk_fhir.service.events import EventBroker

from .conftest import wait_for  # type: ignore[import-not-found]


def _submit(client, image: bytes, **fields: str):
    return client.post("/v1/analyses", data={"image": (io.BytesIO(image), "cell.png"), **fields})


@pytest.mark.parametrize(("field", "value", "words"), [
    ("patient_name", "A" * 201, "longer than 200"),
    ("patient_name", "Al\x00ice", "control characters"),
    ("patient_name", "Eve\u202eevil", "control characters"),
    ("patient_identifier", "MRN\n1", "control characters"),
    ("patient_sex", "banana", "patient_sex"),
    ("patient_birth_date", (date.today() + timedelta(days=1)).isoformat(), "in the future"),
    ("ordering_practitioner", 'Practitioner/"><img src=x>', "not a FHIR reference"),
    ("ordering_practitioner", "Practitioner/a b", "not a FHIR reference"),
])
def test_bad_order_fields_are_refused_before_anything_is_kept(
    make_app, cell_png, field, value, words
) -> None:
    app = make_app()
    client = app.test_client()
    response = _submit(client, cell_png(), **{field: value})
    assert response.status_code == 400, response.get_json()
    assert words in response.get_json()["detail"]
    assert app.extensions["leuk_fhir"].store.count_by_status() == {}


def test_an_image_too_small_to_analyse_is_refused_at_the_door(make_app) -> None:
    app = make_app()
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="PNG")
    response = app.test_client().post(
        "/v1/analyses", data={"image": (io.BytesIO(out.getvalue()), "dot.png")})
    assert response.status_code == 422, response.get_json()
    assert "too small" in response.get_json()["detail"]
    assert app.extensions["leuk_fhir"].store.count_by_status() == {}


def test_files_only_under_the_documented_field(make_app, cell_png) -> None:
    app = make_app()
    response = app.test_client().post(
        "/v1/analyses", data={"file": (io.BytesIO(cell_png()), "cell.png")})
    assert response.status_code == 400
    assert "'image'" in response.get_json()["detail"]
    assert app.extensions["leuk_fhir"].store.count_by_status() == {}


def test_good_order_fields_are_taken(make_app, cell_png) -> None:
    app = make_app()
    client = app.test_client()
    response = _submit(client, cell_png(), patient_sex="F", patient_name="Doe^Jane",
                       ordering_practitioner="Practitioner?identifier=urn:npi|123-4")
    assert response.status_code == 202, response.get_json()
    # patient data in the URL is not read (it would end up in access logs)
    response = client.post("/v1/analyses?patient_name=Leaky",
                           data={"image": (io.BytesIO(cell_png()), "c.png")})
    record = app.extensions["leuk_fhir"].store.get_analysis(response.get_json()["id"])
    assert "patient" not in record.order or not record.order["patient"]


def test_answers_carry_security_and_caching_headers(make_app) -> None:
    client = make_app().test_client()
    for path in ("/", "/v1/analyses", "/v1/model", "/healthz"):
        response = client.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"] == "no-referrer", path
        assert response.headers["X-Frame-Options"] == "SAMEORIGIN", path
    assert client.get("/v1/analyses").headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'self'" in client.get("/").headers["Content-Security-Policy"]
    assert client.get("/metrics").headers["Content-Type"].count("charset") == 1


def test_lists_and_ids_out_of_range_are_client_errors(make_app) -> None:
    client = make_app().test_client()
    assert client.get("/v1/analyses?status=bogus").status_code == 400
    assert client.get("/v1/analyses?status=failed").status_code == 200
    response = client.post(f"/v1/deliveries/{2**70}/retry")
    assert response.status_code == 404, response.get_json()


def test_event_streams_are_capped_so_requests_are_always_answered(make_app) -> None:
    app = make_app()
    app.extensions["leuk_fhir"].broker.max_streams = 2
    client = app.test_client()
    streams = [client.get("/v1/events", buffered=False) for _ in range(2)]
    assert all(s.status_code == 200 for s in streams)
    refused = client.get("/v1/events")
    assert refused.status_code == 503
    assert refused.get_json()["type"].endswith("service-busy")
    assert int(refused.headers["Retry-After"]) > 0
    assert client.get("/healthz").status_code == 200
    for s in streams:
        next(s.response)  # the generator registers on first read; closing it unregisters
        s.close()
    assert client.get("/v1/events", buffered=False).status_code == 200


def test_an_event_stream_ends_after_its_maximum_age() -> None:
    """The browser reconnects (and signs in again): a revoked token's stream does not linger."""
    broker = EventBroker()
    started = time.monotonic()
    lines = list(broker.stream(heartbeat_s=0.05, max_age_s=0.3))
    assert 0.25 < time.monotonic() - started < 5
    assert lines[0].startswith("retry:") and broker.subscriber_count == 0


# ---- with analyses run by the demo model ---------------------------------------------------


def _run(client, image: bytes, **fields: str) -> dict:
    response = _submit(client, image, **fields)
    assert response.status_code == 202, response.get_json()
    body = wait_for(client, response.get_json()["id"])
    assert body["status"] == "completed", body
    return body


@pytest.mark.slow
def test_the_same_image_for_two_patients_gives_each_their_own_report(running_app, cell_png) -> None:
    app, client = running_app, running_app.test_client()
    outbox = app.extensions["leuk_fhir"].outbox
    image = cell_png("blast", 7)
    alice = _run(client, image, patient_identifier="MRN-AAA", ordering_practitioner="Practitioner/a")
    bob = _run(client, image, patient_identifier="MRN-BBB", ordering_practitioner="Practitioner/b")
    assert alice["report"]["identifier"] != bob["report"]["identifier"]
    for body, mrn, doctor in ((alice, "MRN-AAA", "Practitioner/a"), (bob, "MRN-BBB", "Practitioner/b")):
        kinds = {d["kind"]: outbox.get_by_key(d["key"]).bundle for d in body["deliveries"]}
        assert mrn in json.dumps(kinds["report"])
        assert doctor in json.dumps(kinds["communication"])
    # the same submission again is the same report: signed off once, through either analysis
    again = _run(client, image, patient_identifier="MRN-AAA", ordering_practitioner="Practitioner/a")
    assert again["report"]["identifier"] == alice["report"]["identifier"]
    assert client.post(f"/v1/analyses/{alice['id']}/sign-off",
                       json={"signed_off_by": "Dr A"}).status_code == 200
    refused = client.post(f"/v1/analyses/{again['id']}/sign-off", json={"signed_off_by": "Dr C"})
    assert refused.status_code == 409 and alice["id"] in refused.get_json()["detail"]
    assert client.post(f"/v1/analyses/{bob['id']}/sign-off",
                       json={"signed_off_by": "Dr B"}).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(("raw", "content_type", "words"), [
    (b'{"signed_off_by": "Dr X", "comment": "NOT leukaemia",', "application/json", "not valid JSON"),
    (b'{"signed_off_by": "Dr X"}', "text/plain", "application/json"),
    (b'["Dr X"]', "application/json", "JSON object"),
    (b'{"signed_off_by": 123}', "application/json", "must be a string"),
    (b'{"signed_off_by": "Dr X", "comment": 5}', "application/json", "must be a string"),
])
def test_a_broken_sign_off_changes_nothing(running_app, cell_png, raw, content_type, words) -> None:
    client = running_app.test_client()
    analysis = _run(client, cell_png("normal", 3))
    response = client.post(f"/v1/analyses/{analysis['id']}/sign-off", data=raw,
                           content_type=content_type)
    assert response.status_code == 400, response.get_json()
    assert words in response.get_json()["detail"]
    after = client.get(f"/v1/analyses/{analysis['id']}").get_json()
    assert after["report"]["status"] == "preliminary"
    assert {d["kind"] for d in after["deliveries"]} == {"report"}


@pytest.mark.slow
def test_of_two_concurrent_sign_offs_one_wins_and_every_record_names_it(running_app, cell_png) -> None:
    client = running_app.test_client()
    service = running_app.extensions["leuk_fhir"]
    for seed in range(3):
        analysis = _run(client, cell_png("normal", 20 + seed))
        barrier = threading.Barrier(2)
        outcome: dict[str, str] = {}

        def sign(name: str, analysis_id: str = analysis["id"], barrier: threading.Barrier = barrier,
                 outcome: dict[str, str] = outcome) -> None:
            barrier.wait()
            try:
                service.sign_off(analysis_id, signed_off_by=name, practitioner_identifier=name,
                                 role="clinician", comment=None)
                outcome[name] = "signed"
            except ConflictError:
                outcome[name] = "conflict"

        threads = [threading.Thread(target=sign, args=(n,)) for n in ("dr-left", "dr-right")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcome.values()) == ["conflict", "signed"]
        (winner,) = (n for n, o in outcome.items() if o == "signed")
        (loser,) = (n for n, o in outcome.items() if o == "conflict")
        record = service.store.get_analysis(analysis["id"])
        assert record.signed_off_by == winner and record.report_status == "final"
        html = client.get(f"/v1/analyses/{analysis['id']}/report.html").data.decode()
        bundle = json.dumps(client.get(f"/v1/analyses/{analysis['id']}/fhir").get_json())
        assert winner in html and loser not in html
        assert winner in bundle and loser not in bundle
