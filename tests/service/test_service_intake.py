"""Submitting work: persisted before 202, bad input refused with a clear problem and nothing
kept, a full queue answered 503 + Retry-After, unfinished work re-queued after a restart."""

from __future__ import annotations

import io
import threading
import time

from leuk_fhir.service.store import QUEUED
from leuk_fhir.service.worker import AnalysisQueue


def _files(client_app) -> list:
    data_dir = client_app.extensions["leuk_fhir"].data_dir
    return sorted(p for p in (data_dir / "analyses").rglob("*") if p.is_file()) \
        if (data_dir / "analyses").exists() else []


def test_accepted_upload_is_on_disk_and_in_the_database_before_202(make_app, cell_png) -> None:
    app = make_app()
    image = cell_png("blast", 3)
    response = app.test_client().post(
        "/v1/analyses",
        data={"image": (io.BytesIO(image), "Doe^Jane smear.png"),
              "ordering_practitioner": "Practitioner/dr-x", "patient_identifier": "MRN-123"},
    )
    assert response.status_code == 202
    body = response.get_json()
    assert response.headers["Location"] == f"/v1/analyses/{body['id']}"
    record = app.extensions["leuk_fhir"].store.get_analysis(body["id"])
    assert record.status == QUEUED
    assert record.upload_path.read_bytes() == image
    assert record.order["ordering_practitioner"] == "Practitioner/dr-x"
    assert record.order["patient"]["identifier"] == "MRN-123"
    assert "/" not in record.upload_path.name and " " not in record.upload_path.name


def test_raw_body_upload(make_app, cell_png) -> None:
    app = make_app()
    response = app.test_client().post(
        "/v1/analyses?filename=cell.png", data=cell_png(), content_type="image/png")
    assert response.status_code == 202


def test_several_images_in_one_request_make_several_analyses(make_app, cell_png) -> None:
    app = make_app()
    response = app.test_client().post("/v1/analyses", data={"image": [
        (io.BytesIO(cell_png("blast", 1)), "a.png"), (io.BytesIO(cell_png("normal", 2)), "b.png"),
        (io.BytesIO(b"not an image at all"), "c.png"),
    ]})
    assert response.status_code == 202
    body = response.get_json()
    assert len(body["analyses"]) == 2
    assert body["rejected"][0]["filename"] == "c.png"


def test_invalid_input_is_refused_and_nothing_is_kept(make_app, cell_png) -> None:
    app = make_app()
    client = app.test_client()
    not_image = client.post("/v1/analyses", data={"image": (io.BytesIO(b"hello, not a png"), "x.png")})
    assert not_image.status_code in (415, 422)
    assert not_image.mimetype == "application/problem+json"
    problem = not_image.get_json()
    assert problem["status"] == not_image.status_code and problem["detail"]
    empty = client.post("/v1/analyses", data={"image": (io.BytesIO(b""), "e.png")})
    assert empty.status_code == 400
    nothing = client.post("/v1/analyses", data={"note": "no file"})
    assert nothing.status_code == 400 and "no image" in nothing.get_json()["detail"]
    bad_ref = client.post("/v1/analyses", data={
        "image": (io.BytesIO(cell_png()), "x.png"), "ordering_practitioner": "Dr X"})
    assert bad_ref.status_code == 400
    assert app.extensions["leuk_fhir"].store.list_analyses() == []
    assert _files(app) == []


def test_body_and_image_size_limits(make_app, settings, cell_png) -> None:
    app = make_app(settings_=settings.replace(service__max_request_bytes=2000))
    too_big = app.test_client().post("/v1/analyses", data={"image": (io.BytesIO(b"x" * 5000), "a.png")})
    assert too_big.status_code == 413
    assert too_big.mimetype == "application/problem+json"

    from PIL import Image

    huge = io.BytesIO()
    Image.new("RGB", (3000, 3000), "white").save(huge, format="PNG")
    app2 = make_app(settings_=settings.replace(image__max_pixels=1_000_000))
    bomb = app2.test_client().post("/v1/analyses", data={"image": (io.BytesIO(huge.getvalue()), "big.png")})
    assert bomb.status_code == 413
    assert bomb.get_json()["type"].endswith("image-too-large")
    assert app2.extensions["leuk_fhir"].store.list_analyses() == []


def test_full_queue_answers_503_with_retry_after_and_keeps_nothing(make_app, settings, cell_png) -> None:
    app = make_app(settings_=settings.replace(service__queue_size=2))
    client = app.test_client()
    for seed in (1, 2):
        assert client.post("/v1/analyses", data={"image": (io.BytesIO(cell_png(seed=seed)), "a.png")}).status_code == 202
    full = client.post("/v1/analyses", data={"image": (io.BytesIO(cell_png(seed=3)), "a.png")})
    assert full.status_code == 503
    assert int(full.headers["Retry-After"]) > 0
    assert full.get_json()["type"].endswith("queue-full")
    assert len(app.extensions["leuk_fhir"].store.list_analyses()) == 2


def test_queue_bounds_admission_and_recovers_everything() -> None:
    done: list[str] = []
    gate = threading.Event()

    def process(analysis_id: str) -> None:
        gate.wait(5)
        done.append(analysis_id)

    queue = AnalysisQueue(process, workers=1, capacity=2)
    queue.start(recovered_ids=["old-1", "old-2", "old-3"])  # recovered work ignores the bound
    assert queue.pending == 3
    try:
        queue.reserve()
    except Exception as exc:
        assert type(exc).__name__ == "QueueFullError"
    else:
        raise AssertionError("reserve() should refuse while 3 of 2 places are taken")
    gate.set()
    deadline = time.monotonic() + 5
    while queue.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == ["old-1", "old-2", "old-3"]
    queue.reserve()
    queue.commit("new-1")
    deadline = time.monotonic() + 5
    while queue.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done[-1] == "new-1"
    queue.stop()
