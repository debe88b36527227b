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


# --------------------------------------------------------------------------- hostile content


def _with_patient(f, **changes):
    import dataclasses

    acq = f.acquisition
    return dataclasses.replace(f, acquisition=dataclasses.replace(
        acq, patient=dataclasses.replace(acq.patient, **changes)))


def _html_form(resource: dict) -> str:
    form = next(p for p in resource["presentedForm"] if p["contentType"].startswith("text/html"))
    return base64.b64decode(form["data"]).decode("utf-8")


def _text_outside_page(data: bytes) -> list[str]:
    """Text runs of the PDF that run past the right edge of the page (or start left of it)."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    bad: list[str] = []
    for page in PdfReader(io.BytesIO(data)).pages:
        right = float(page.mediabox.width)

        def visit(text, cm, tm, font, size, right=right):
            if not text.strip():
                return
            scale = cm[0] * tm[0] or 1.0
            x = tm[4] * cm[0] + cm[4]
            name = str((font or {}).get("/BaseFont", "/Helvetica")).lstrip("/")
            # an embedded subset is named "ABCDEF+DejaVuSans-Bold"; reportlab knows it by the
            # name the report registered it under
            name = name.split("+")[-1].replace("DejaVuSans", "LeukSans")
            width = stringWidth(text.strip("\n"), name, size * abs(scale))
            if x < 0 or x + width > right + 1:
                bad.append(text[:40])

        page.extract_text(visitor_text=visit)
    return bad


def test_non_latin_names_are_substituted_visibly_not_dropped(fhir_settings):
    cases = {
        "山田^太郎": "[U+592A][U+90CE] [U+5C71][U+7530]",
        "محمد^أحمد": "[U+0623][U+062D][U+0645][U+062F]",
        "शर्मा^राहुल": "[U+0936][U+0930][U+094D][U+092E][U+093E]",
        "Doe^Jane 🩸": "Jane [U+1FA78] Doe",
        "Doe\x00^Jane": "Doe[U+0000]",
    }
    for name, shown in cases.items():
        f = _with_patient(make_findings(), name=name)
        rb = build_report_bundle(f, fhir_settings, now=NOW)
        text = " ".join(pdf_text(rb.pdf or b"").split())
        assert shown in text, (name, text[:400])
        assert "■" not in text  # no anonymous boxes for unknown glyphs
        assert "cannot show are written as [U+XXXX]" in text
    # Latin text needs no substitution and gets no note
    text = " ".join(pdf_text(build_report_bundle(make_findings(), fhir_settings, now=NOW).pdf or b"").split())
    assert "[U+" not in text and "[U+XXXX]" not in text


def test_european_scripts_print_as_written_in_an_embedded_font(fhir_settings):
    """Polish, Czech, Turkish, Romanian, Greek and Cyrillic names are not cp1252: the PDF
    embeds a Unicode font (DejaVu Sans, from matplotlib), so they print as written."""
    cases = {
        "Wiśniewski^Łukasz": "Łukasz Wiśniewski",
        "Dvořák^Jiří": "Jiří Dvořák",
        "Öztürk^Şükrü Ğ": "Şükrü Ğ Öztürk",
        "Țăranu^Ștefan": "Ștefan Țăranu",
        "Παπαδοπούλου^Ελένη": "Ελένη Παπαδοπούλου",
        "Иванова^Мария": "Мария Иванова",
    }
    for name, shown in cases.items():
        rb = build_report_bundle(_with_patient(make_findings(), name=name), fhir_settings, now=NOW)
        pdf = rb.pdf or b""
        text = " ".join(pdf_text(pdf).split())
        assert shown in text, (name, text[:400])
        assert "[U+" not in text, (name, text[:400])
        assert b"/FontFile2" in pdf  # the font travels with the report
    # right-to-left scripts would print reversed and unshaped: substituted, as before
    rb = build_report_bundle(_with_patient(make_findings(), name="כהן^דוד"), fhir_settings, now=NOW)
    assert "[U+05D3][U+05D5][U+05D3]" in " ".join(pdf_text(rb.pdf or b"").split())


def test_the_pdf_falls_back_to_helvetica_and_cp1252_without_the_font():
    from leuk_fhir.fhir.rendering import HELVETICA, pdf_safe_text

    assert pdf_safe_text("Zoë Łukasz", HELVETICA) == ("Zoë [U+0141]ukasz", True)


def test_combining_characters_are_composed_for_the_pdf(fhir_settings):
    f = _with_patient(make_findings(), name="Zoe\u0301^Ame\u0301lie")
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    text = " ".join(pdf_text(rb.pdf or b"").split())
    assert "Amélie Zoé" in text
    assert "[U+" not in text


def test_html_keeps_exact_text_and_escapes_markup(fhir_settings):
    name = '<script>alert("x")</script>^山田 🩸'
    f = _with_patient(make_findings(), name=name)
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    assert "<script>" not in rb.html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in rb.html
    assert "山田 🩸" in rb.html  # the HTML shows the original script, not code points
    text = " ".join(pdf_text(rb.pdf or b"").split())
    assert '<script>alert("x")</script>' in text  # shown literally, not interpreted


def test_signoff_comment_keeps_line_breaks_and_is_escaped(fhir_settings):
    f = make_findings()
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    s = build_signoff_bundle(rb, practitioner_identifier="dr-42", practitioner_name="Dr <b>Ada</b>",
                             signed_at=NOW, findings=f,
                             comment="First line\nsecond <i>line</i> & more\r\nthird")
    dr = next(e["resource"] for e in s["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    page = _html_form(dr)
    assert "First line<br>second &lt;i&gt;line&lt;/i&gt; &amp; more<br>third" in page
    assert "Dr &lt;b&gt;Ada&lt;/b&gt;" in page
    pdf = base64.b64decode(next(p for p in dr["presentedForm"] if p["contentType"] == "application/pdf")["data"])
    lines = pdf_text(pdf).splitlines()
    assert any(line.strip().endswith("First line") for line in lines), lines
    assert any(line.strip().startswith("second <i>line</i> & more") for line in lines), lines


def test_long_unbroken_text_stays_on_the_page(fhir_settings):
    import dataclasses

    f = _with_patient(make_findings(labels=("blast", "indeterminate")), name="A" * 500)
    f = dataclasses.replace(f, acquisition=dataclasses.replace(f.acquisition, filename="x" * 500 + ".png"))
    cells = (f.cells[0], dataclasses.replace(f.cells[1], indeterminate_reason="r" * 500))
    f = dataclasses.replace(f, cells=cells)
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    assert _text_outside_page(rb.pdf or b"") == []
    flat = "".join(pdf_text(rb.pdf or b"").split())
    assert "A" * 500 in flat and "x" * 500 in flat and "r" * 500 in flat  # wrapped, not cut


def test_many_cells_small_and_listing_says_it_is_partial(fhir_settings, artifacts_dir):
    """2,000 cells in one field (render time is a benchmark's business, not a test's)."""
    import dataclasses

    f = make_findings()
    cells = tuple(dataclasses.replace(f.cells[i % 3], box=(i % 600, (i * 7) % 440, 30, 30))
                  for i in range(2000))
    f = dataclasses.replace(f, cells=cells)
    rb = build_report_bundle(f, fhir_settings, now=NOW)
    assert rb.pdf is not None
    (artifacts_dir / "report-2000-cells.pdf").write_bytes(rb.pdf)
    assert len(rb.pdf) < 400_000  # ~180 kB measured
    text = " ".join(pdf_text(rb.pdf).split())
    assert "Showing the first 200 of 2000 cells" in text
    assert "Showing the first 200 of 2000 cells" in rb.html
    assert _text_outside_page(rb.pdf) == []


def test_zero_and_indeterminate_only_render(fhir_settings):
    for labels in ((), ("indeterminate",) * 3):
        rb = build_report_bundle(make_findings(labels=labels), fhir_settings, now=NOW)
        text = " ".join(pdf_text(rb.pdf or b"").split())
        assert "Indeterminate" in text and "Showing the first" not in text
