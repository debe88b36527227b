"""The human-readable report: PDF and HTML rendered from the same findings."""

from __future__ import annotations

import base64
import hashlib
import io
from datetime import UTC, datetime

from pypdf import PdfReader

from leuk_fhir.fhir import build_report_bundle, build_signoff_bundle

from .conftest import make_findings  # type: ignore[import-not-found]

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def test_pdf_shows_findings_model_and_disclaimer(fhir_settings, artifacts_dir):
    f = make_findings(labels=("blast", "lymphocyte", "indeterminate"))
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    assert rb.pdf is not None and rb.pdf.startswith(b"%PDF")
    (artifacts_dir / "report-field.pdf").write_bytes(rb.pdf)
    (artifacts_dir / "report-field.html").write_text(rb.html, encoding="utf-8")
    text = " ".join(pdf_text(rb.pdf).split())
    for expected in ("AI-generated", "artificial intelligence", "Jane Doe", "MRN-0001", "SP-0",
                     "May-Grunwald-Giemsa", "Lymphoblast", "Lymphocyte", "indeterminate",
                     "Blast percentage", "50.0% of 2 classified cells", "leuk-hosvd-test", "1.0.0",
                     "accuracy_mean 0.97", "Preliminary: not yet reviewed", rb.report_identifier):
        assert expected in text, expected
    reader = PdfReader(io.BytesIO(rb.pdf))
    assert sum(len(p.images) for p in reader.pages) == 1
    assert len(rb.pdf) < 150_000
    # the same content as HTML
    for expected in ("AI-generated", "MRN-0001", "Lymphoblast", "leuk-hosvd-test", "data:image/jpeg;base64,"):
        assert expected in rb.html
    # the attachment in the DiagnosticReport is exactly this PDF
    form = next(p for p in rb.diagnostic_report["presentedForm"] if p["contentType"] == "application/pdf")
    assert base64.b64decode(form["data"]) == rb.pdf
    assert form["hash"] == base64.b64encode(hashlib.sha1(rb.pdf).digest()).decode()
    assert form["size"] == len(rb.pdf)


def test_large_image_is_downscaled(fhir_settings):
    import dataclasses

    import numpy as np

    from .conftest import ArrayPixelSource  # type: ignore[import-not-found]

    f = make_findings()
    big = np.full((3000, 4000, 3), 200, np.uint8)
    f = dataclasses.replace(f, acquisition=dataclasses.replace(f.acquisition, pixels=ArrayPixelSource(big)))
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    assert rb.pdf is not None and len(rb.pdf) < 150_000


def test_signed_off_pdf_says_final(fhir_settings, artifacts_dir):
    f = make_findings()
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    s = build_signoff_bundle(rb, practitioner_identifier="dr-42", practitioner_name="Dr Ada Smith",
                             signed_at=NOW, findings=f)
    dr = next(e["resource"] for e in s["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    pdf = base64.b64decode(next(p for p in dr["presentedForm"] if p["contentType"] == "application/pdf")["data"])
    (artifacts_dir / "report-signed-off.pdf").write_bytes(pdf)
    text = " ".join(pdf_text(pdf).split())
    assert "Final: signed off by Dr Ada Smith" in text


def test_unreadable_pixels_still_give_a_report(fhir_settings):
    import dataclasses

    class Broken:
        levels = ()
        frame_count = 1

        def read_frame(self, index=0):
            raise OSError("disk gone")

    f = make_findings()
    src = Broken()
    f = dataclasses.replace(f, acquisition=dataclasses.replace(f.acquisition, pixels=src))  # type: ignore[arg-type]
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    assert "Image not available" in " ".join(pdf_text(rb.pdf or b"").split())
