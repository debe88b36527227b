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


def test_a_full_disk_is_a_507_that_keeps_nothing_and_the_service_recovers(
    make_app, settings, cell_png, small_disk
) -> None:
    """The data directory on a full file system (a real tmpfs): an upload is answered
    507 storage-full with nothing half-written left; once space is freed the same upload is
    accepted and analysed."""
    import numpy as np
    from PIL import Image

    app = make_app(start=True, settings_=settings.replace(data_dir=small_disk.path / "data"))
    client = app.test_client()
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="PNG")  # about 1.4 MB, incompressible
    small_disk.fill(leave=256 * 1024)
    response = client.post("/v1/analyses", data={"image": (io.BytesIO(big.getvalue()), "f.png")})
    assert response.status_code == 507, response.get_json()
    body = response.get_json()
    assert body["type"].endswith("storage-full") and "no space left" in body["detail"]
    assert _files(app) == [] and app.extensions["leuk_fhir"].store.list_analyses() == []
    small_disk.free()
    response = client.post("/v1/analyses", data={"image": (io.BytesIO(cell_png("blast", 7)), "c.png")})
    assert response.status_code == 202
    analysis_id = response.get_json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/analyses/{analysis_id}").get_json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.get(f"/v1/analyses/{analysis_id}").get_json()["status"] == "completed"



def test_on_a_full_disk_every_request_answers_clearly(make_app, settings, cell_png, small_disk) -> None:
    """With no byte left (a real tmpfs), SQLite cannot even open its databases for reading
    ("disk I/O error"): requests answer 507 storage-full, not 500, and work again once space
    is freed."""
    app = make_app(start=True, settings_=settings.replace(data_dir=small_disk.path / "data"))
    client = app.test_client()
    response = client.post("/v1/analyses", data={"image": (io.BytesIO(cell_png("normal", 9)), "c.png")})
    assert response.status_code == 202
    small_disk.fill(leave=0)
    answers = [client.get("/v1/analyses"), client.post(
        "/v1/analyses", data={"image": (io.BytesIO(cell_png("normal", 10)), "d.png")})]
    for answer in answers:
        assert answer.status_code in (200, 507), answer.get_json()
        if answer.status_code == 507:
            assert answer.get_json()["type"].endswith("storage-full")
    assert answers[1].status_code == 507
    small_disk.free()
    assert client.get("/v1/analyses").status_code == 200
