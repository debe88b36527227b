"""The clinician page in Debian's headless Chromium (Playwright, no browser download).

Screenshots go to test-artifacts/service/: look at them.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "service"


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (bash scripts/setup --test)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def _until(page, expression: str, timeout_s: float = 120) -> None:
    """Poll a JS expression (page.evaluate is not subject to the page's CSP, which forbids eval)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.1)


def _ready(client, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").get_json()
        time.sleep(0.1)


BCCD_FIELD = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "bccd" / "BCCD"
              / "JPEGImages" / "BloodImage_00000.jpg")


def _field_image() -> bytes:
    """A real smear field (BCCD, ../shared/datasets) with a white cell to outline."""
    if not BCCD_FIELD.exists():
        pytest.skip(f"{BCCD_FIELD} is missing (the shared datasets)")
    return BCCD_FIELD.read_bytes()


def test_list_detail_alert_and_sign_off(make_app, live_server, browser, cell_png, tmp_path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    app = make_app(start=True)
    client = app.test_client()
    _ready(client)
    server = live_server(app)
    # one field analysed before the page opens
    field = client.post("/v1/analyses", data={"image": (io.BytesIO(_field_image()), "field.jpg")})
    assert field.status_code == 202

    # tall enough that full-page screenshots include the report frame (frames outside the
    # viewport are not painted into full-page screenshots)
    page = browser.new_page(viewport={"width": 1280, "height": 1900})
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#live.on", timeout=10_000)  # the SSE stream is connected
    assert page.is_visible("#demo-banner")
    assert "DEMO" in page.inner_text("#demo-banner")

    # upload a blast through the page; the alert arrives over SSE
    blast = tmp_path / "blast.png"
    blast.write_bytes(cell_png("blast", 7))
    page.set_input_files("#upload-file", str(blast))
    page.fill("#upload-orderer", "Practitioner/dr-x")
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector(".alert", timeout=120_000)
    assert "Blasts detected" in page.inner_text(".alert")
    page.wait_for_selector("tr.row.blasts", timeout=10_000)
    _until(page, "document.querySelectorAll('tr.row').length >= 2")
    _until(page, "[...document.querySelectorAll('tr.row')].every(r => !/queued|running/.test(r.innerText))")
    page.screenshot(path=str(ARTIFACTS / "list.png"), full_page=True)
    assert page.is_visible("#demo-banner")

    # detail of the blast: image, outlined cell, probabilities, report, FHIR JSON
    page.click("tr.row.blasts a")
    page.wait_for_selector("#overlay rect.cell-box", timeout=20_000)
    _until(page, "document.getElementById('detail-image').naturalWidth > 0")
    assert page.get_attribute("#overlay rect.cell-box", "stroke") == "#d62728"
    assert page.is_visible("#demo-banner") and page.is_visible("#detail-demo")
    assert "blasts-detected" in page.inner_text("#summary")
    assert page.locator("#cell-rows tr").count() >= 1
    report = page.frame_locator("#report-frame")
    report.locator("h1").wait_for(timeout=20_000)
    assert "AI-generated" in report.locator("body").inner_text()
    assert "DEMO" in report.locator("body").inner_text()
    assert "DiagnosticReport" in page.text_content("#fhir-json")
    assert "communication" in page.inner_text("#deliveries")
    page.screenshot(path=str(ARTIFACTS / "detail-blast.png"), full_page=True)

    # sign off from the page
    page.fill("#signoff-name", "Dr Ada Haem")
    page.fill("#signoff-comment", "Reviewed on screen")
    page.click("#signoff-button")
    page.wait_for_selector("#signoff-state .badge.final", timeout=10_000)
    assert "Dr Ada Haem" in page.inner_text("#signoff-state")
    assert page.is_hidden("#signoff-form")
    _until(page, "document.getElementById('report-frame').src.includes('v=final')")
    page.frame_locator("#report-frame").locator("text=Dr Ada Haem").first.wait_for(timeout=20_000)
    page.screenshot(path=str(ARTIFACTS / "detail-signed-off.png"), full_page=True)

    # a real smear field: the detected white cell outlined on the field
    field_id = field.get_json()["id"]
    page.goto(f"{server.url}/#/analyses/{field_id}")
    _until(page, f"document.getElementById('detail-title').innerText.includes('{field_id}')")
    _until(page, "document.querySelectorAll('#cell-rows tr').length > 0 && "
                 "document.querySelectorAll('#overlay rect.cell-box').length === "
                 "document.querySelectorAll('#cell-rows tr').length")
    page.screenshot(path=str(ARTIFACTS / "detail-field.png"), full_page=True)
    assert not [e for e in console_errors if "favicon" not in e], console_errors


def test_page_asks_for_a_token_when_auth_is_on(make_app, settings, live_server, browser) -> None:
    app = make_app(settings_=settings.replace(service__require_auth=True))
    _, token = app.extensions["leuk_fhir"].store.create_token(name="Dr Ada Haem", role="clinician")
    server = live_server(app)
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#token-panel:not([hidden])", timeout=10_000)
    page.fill("#token-input", token)
    page.click("#token-form button")
    page.wait_for_selector("#live.on", timeout=10_000)
    page.wait_for_selector("#analysis-rows td", timeout=10_000)
    assert "No analyses yet" in page.inner_text("#analysis-rows")
    assert page.is_hidden("#token-panel")
