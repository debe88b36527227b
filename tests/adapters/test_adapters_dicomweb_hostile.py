"""``pull`` against a PACS that misbehaves: answers that inflate without end, declare or send
more than ``image.max_bytes``, or break off mid-body.

Orthanc (tests/adapters/test_adapters_orthanc.py) cannot be made to answer like this, so a
loopback stand-in (a FAKE PACS, by design) serves QIDO-RS with one instance and WADO-RS
with the hostile answer under test. The client side is the real one: dicomweb-client over
:class:`~leuk_fhir.adapters.dicomweb_pull.BoundedSession`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from leuk_fhir.adapters.dicomweb_pull import (
    BoundedSession,
    DicomWebError,
    DicomWebTooLargeError,
    pull_study,
)
from leuk_fhir.adapters.synthetic import dicom_microscopy_dataset, synthetic_smear_field
from leuk_fhir.settings import ImageSettings

FIELD, _ = synthetic_smear_field(160, 120, white_cells=1, red_cells=4, cell_diameter=40, seed=5)
MIB = 1 << 20


def _instance() -> pydicom.Dataset:
    return dicom_microscopy_dataset(FIELD, accession_number="HOSTILE-1")


def _qido(ds: pydicom.Dataset) -> bytes:
    return json.dumps(
        [
            {
                "00080016": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                "0020000D": {"vr": "UI", "Value": [str(ds.StudyInstanceUID)]},
                "0020000E": {"vr": "UI", "Value": [str(ds.SeriesInstanceUID)]},
                "00080018": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
            }
        ]
    ).encode()


def _multipart(part: bytes, boundary: str = "leukfhirboundary") -> tuple[bytes, str]:
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


Wado = Callable[[BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def fake_pacs(ds: pydicom.Dataset, wado: Wado) -> Iterator[str]:
    """A loopback DICOMweb stand-in; ``wado`` writes the whole WADO-RS answer itself."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.split("?")[0].endswith("/instances") and "/series/" not in self.path:
                first_page = "offset=" not in self.path or "offset=0" in self.path
                body = _qido(ds) if first_page else b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.close_connection = True
            with contextlib.suppress(OSError):
                wado(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _send(h: BaseHTTPRequestHandler, body: bytes, ctype: str, **headers: str) -> None:
    h.send_response(200)
    h.send_header("Content-Type", ctype)
    for name, value in headers.items():
        h.send_header(name.replace("_", "-"), value)
    h.end_headers()
    h.wfile.write(body)


def test_a_well_behaved_answer_passes_the_bound(tmp_path: Path) -> None:
    """The stand-in itself works: a plain and a gzip-encoded instance are stored."""
    ds = _instance()
    body, ctype = _multipart(_dicom_bytes(ds))
    for encoded in (False, True):
        payload = gzip.compress(body) if encoded else body
        extra = {"Content_Encoding": "gzip"} if encoded else {}

        def wado(h: BaseHTTPRequestHandler, payload: bytes = payload, extra: dict = extra) -> None:
            _send(h, payload, ctype, Content_Length=str(len(payload)), **extra)

        with fake_pacs(ds, wado) as url:
            pulled = pull_study(url, str(ds.StudyInstanceUID), tmp_path / f"spool{encoded}")
        assert [ref.sop_instance_uid for _, ref in pulled.stored] == [ds.SOPInstanceUID]
        assert pulled.skipped == []


def test_a_compression_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """64 KiB of gzip that inflates to 256 MiB, against a 4 MiB bound: refused, typed, and
    the peak memory stays near the bound, not near 256 MiB."""
    ds = _instance()
    inflated = _multipart(_dicom_bytes(ds) + bytes(256 * MIB))[0]
    bomb = gzip.compress(inflated, compresslevel=9)
    del inflated
    assert len(bomb) < MIB

    def wado(h: BaseHTTPRequestHandler) -> None:
        _send(h, bomb, _multipart(b"")[1], Content_Length=str(len(bomb)), Content_Encoding="gzip")

    settings = ImageSettings(max_bytes=4 * MIB)
    with fake_pacs(ds, wado) as url:
        tracemalloc.start()
        try:
            with pytest.raises(DicomWebTooLargeError, match=r"beyond 4194304 bytes \(image\.max_bytes\)"):
                pull_study(url, str(ds.StudyInstanceUID), tmp_path / "spool", image_settings=settings)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 24 * MIB, peak
    assert not list((tmp_path / "spool").rglob("*")) if (tmp_path / "spool").exists() else True


def test_a_declared_oversize_answer_is_refused_before_reading_it(tmp_path: Path) -> None:
    ds = _instance()

    def wado(h: BaseHTTPRequestHandler) -> None:
        _send(h, b"x" * 1024, _multipart(b"")[1], Content_Length=str(10 * MIB))

    with fake_pacs(ds, wado) as url, pytest.raises(DicomWebTooLargeError, match="declares 10485760"):
        pull_study(url, str(ds.StudyInstanceUID), tmp_path, image_settings=ImageSettings(max_bytes=MIB))


def test_an_endless_body_is_cut_at_the_bound(tmp_path: Path) -> None:
    """No Content-Length, the body streamed until the client stops reading."""
    ds = _instance()

    def wado(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", _multipart(b"")[1])
        h.end_headers()
        block = bytes(64 * 1024)
        for _ in range(10_000):  # 640 MiB at most; the client hangs up long before
            h.wfile.write(block)

    with fake_pacs(ds, wado) as url, pytest.raises(DicomWebTooLargeError, match="goes on beyond"):
        pull_study(url, str(ds.StudyInstanceUID), tmp_path, image_settings=ImageSettings(max_bytes=2 * MIB))


def test_a_broken_gzip_stream_is_a_typed_error(tmp_path: Path) -> None:
    ds = _instance()
    good = gzip.compress(_multipart(_dicom_bytes(ds))[0])
    broken = good[:40] + bytes(len(good) - 40)

    def wado(h: BaseHTTPRequestHandler) -> None:
        _send(h, broken, _multipart(b"")[1], Content_Length=str(len(broken)), Content_Encoding="gzip")

    with fake_pacs(ds, wado) as url, pytest.raises(DicomWebError, match="failed") as caught:
        pull_study(url, str(ds.StudyInstanceUID), tmp_path, attempts=1)
    assert not isinstance(caught.value, DicomWebTooLargeError)


def test_a_body_that_is_not_dicom_is_skipped_with_its_reason(tmp_path: Path) -> None:
    ds = _instance()
    body, ctype = _multipart(b"<html>maintenance</html>" * 20)

    def wado(h: BaseHTTPRequestHandler) -> None:
        _send(h, body, ctype, Content_Length=str(len(body)))

    with fake_pacs(ds, wado) as url:
        pulled = pull_study(url, str(ds.StudyInstanceUID), tmp_path / "spool", attempts=1)
    assert pulled.stored == []
    [(uid, reason)] = pulled.skipped
    assert uid == ds.SOPInstanceUID and "not a readable DICOM instance" in reason


def test_busy_answers_are_retried_and_too_large_ones_are_not(tmp_path: Path) -> None:
    ds = _instance()
    body, ctype = _multipart(_dicom_bytes(ds))
    calls: list[int] = []

    def busy_then_ok(h: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        if len(calls) == 1:
            h.send_response(503)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        _send(h, body, ctype, Content_Length=str(len(body)))

    with fake_pacs(ds, busy_then_ok) as url:
        pulled = pull_study(url, str(ds.StudyInstanceUID), tmp_path / "a", attempts=3)
    assert len(calls) == 2 and len(pulled.stored) == 1

    calls.clear()

    def too_large(h: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        _send(h, b"", ctype, Content_Length=str(10 * MIB))

    with fake_pacs(ds, too_large) as url, pytest.raises(DicomWebTooLargeError):
        pull_study(url, str(ds.StudyInstanceUID), tmp_path / "b", attempts=3,
                   image_settings=ImageSettings(max_bytes=MIB))
    assert len(calls) == 1


def test_bounded_session_serves_streaming_callers_from_memory() -> None:
    """A caller that asks for a stream (as dicomweb-client does for multipart answers) reads
    the same bytes through ``iter_content``."""
    ds = _instance()
    payload = b"0123456789" * 1000

    def wado(h: BaseHTTPRequestHandler) -> None:
        _send(h, payload, "application/octet-stream", Content_Length=str(len(payload)))

    with fake_pacs(ds, wado) as url, BoundedSession(MIB) as session:
        response = session.get(f"{url}/studies/1/series/2/instances/3", stream=True, timeout=10)
        assert b"".join(response.iter_content(chunk_size=777)) == payload
        assert response.content == payload
