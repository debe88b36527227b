"""The clinician page in Debian's headless Chromium (Playwright, no browser download).

Screenshots go to test-artifacts/service/: look at them.
"""

from __future__ import annotations

import contextlib
import io
import threading
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


BCCD_FIELD = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "bccd" / "BCCD"
              / "JPEGImages" / "BloodImage_00000.jpg")


def _field_image() -> bytes:
    """A real smear field (BCCD, ../shared/datasets) with a white cell to outline."""
    if not BCCD_FIELD.exists():
        pytest.skip(f"{BCCD_FIELD} is missing (the shared datasets)")
    return BCCD_FIELD.read_bytes()


def test_list_detail_alert_and_sign_off(running_app, live_server, browser, cell_png, tmp_path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    app = running_app
    client = app.test_client()
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


# ---- the page as a clinician and an accessibility reviewer see it ------------------------------

_CONTRAST_JS = """(selector) => {
  const rgb = (s) => { const m = s.match(/[\\d.]+/g).map(Number); return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
  const lum = ([r, g, b]) => { const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const background = (node) => {  // blend translucent backgrounds up the tree over white
    const layers = [];
    for (let n = node; n && n.nodeType === 1; n = n.parentElement) {
      const c = rgb(getComputedStyle(n).backgroundColor); if (c[3] > 0) { layers.push(c); if (c[3] === 1) break; } }
    let out = [255, 255, 255];
    for (const c of layers.reverse()) out = out.map((v, i) => c[i] * c[3] + v * (1 - c[3]));
    return out;
  };
  const bad = [];
  for (const node of document.querySelectorAll(selector)) {
    if (!node.offsetParent || node.disabled) continue;
    const fg = rgb(getComputedStyle(node).color), bg = background(node);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    if (ratio < 4.5) bad.push(node.textContent.trim().slice(0, 30) + ' ' + ratio.toFixed(2));
  }
  return bad;
}"""
_BADGES = ".badge, button, .alert, .alert a, #live, label, .error-text, .form-error, .muted, dt"


def _finished(client, analysis_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (body := client.get(f"/v1/analyses/{analysis_id}").get_json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def _no_page_overflow(page, width: int = 400) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= width, "the page scrolls sideways"


def test_page_accessibility_errors_and_mobile(running_app, live_server, browser, cell_png, tmp_path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    app = running_app
    client = app.test_client()
    server = live_server(app)
    long_name = "Wolfeschlegelsteinhausenbergerdorff^Hubertblaineanderverylongnames " * 2
    blast_id = client.post("/v1/analyses", data={
        "image": (io.BytesIO(cell_png("blast", 3)), "x" * 150 + ".png"),
        "ordering_practitioner": "Practitioner/dr-x", "patient_name": long_name.strip(),
        "patient_identifier": "MRN-" + "9" * 40}).get_json()["id"]
    failed_id = client.post("/v1/analyses", data={
        "image": (io.BytesIO(cell_png("blast", 4)[:300]), "truncated.png")}).get_json()["id"]
    assert _finished(client, blast_id)["status"] == "completed"
    assert _finished(client, failed_id)["status"] == "failed"

    # the DEMO banner shows even when the model cannot be asked (fail-safe, not fail-hidden)
    blind = browser.new_page()
    blind.route("**/v1/model", lambda route: route.abort())
    blind.route("**/v1/analyses?*", lambda route: route.abort())
    blind.goto(server.url + "/")
    blind.wait_for_load_state("load")
    time.sleep(1)
    assert blind.is_visible("#demo-banner")
    blind.close()

    page = browser.new_page(viewport={"width": 400, "height": 900})
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#live.on", timeout=10_000)
    page.wait_for_selector(f"tr.row[data-id='{failed_id}']", timeout=10_000)
    assert page.is_visible("#demo-banner")
    # a failed analysis says why, in the list and in the detail
    assert "invalid-image" in page.inner_text(f"tr.row[data-id='{failed_id}']")
    # ARIA: the live state and list changes are announced politely; every input has a label
    assert page.get_attribute("#live", "role") == "status"
    assert page.get_attribute("#list-announce", "role") == "status"
    assert page.evaluate("[...document.querySelectorAll('input')].every(i => i.labels.length > 0)")
    _no_page_overflow(page)
    assert page.evaluate(_CONTRAST_JS, _BADGES) == []
    page.screenshot(path=str(ARTIFACTS / "mobile-list.png"), full_page=True)

    # keyboard: open the analysis from its link; focus lands on the detail heading
    page.focus(f"tr.row[data-id='{blast_id}'] a")
    page.keyboard.press("Enter")
    page.wait_for_selector("#overlay rect.cell-box", timeout=20_000)
    assert page.evaluate("document.activeElement.id") == "detail-title"
    assert "Wolfeschlegelsteinhausenbergerdorff" in page.inner_text("#summary")
    _no_page_overflow(page)
    # blasts are not told by colour alone: dashed outline, "B" mark, text in the legend and table
    assert page.get_attribute("#overlay rect.cell-box.blast", "stroke-dasharray")
    assert "B" in page.text_content("#overlay")
    assert page.locator("#legend .blast").count() == 1
    assert "⚠" in page.inner_text("#cell-rows")
    assert page.evaluate(_CONTRAST_JS, _BADGES) == []
    page.screenshot(path=str(ARTIFACTS / "mobile-detail.png"), full_page=True)

    assert not console, console
    # sign-off without a name (auth off): the browser refuses, nothing is sent
    sign_off = f"**/v1/analyses/{blast_id}/sign-off"
    posts.clear()
    page.click("#signoff-button")
    assert page.evaluate("document.getElementById('signoff-name').matches(':invalid')")
    assert not [u for u in posts if "sign-off" in u]
    label = page.inner_text("#signoff-button")

    # 400 from the server: shown as an alert; the button comes back
    page.route(sign_off, lambda route: route.fulfill(
        status=400, content_type="application/problem+json",
        body='{"title": "Bad input", "status": 400, "detail": "comment must be a string"}'))
    page.fill("#signoff-name", "Dr Ada Haem")
    page.click("#signoff-button")
    page.wait_for_selector("#signoff-error:not([hidden])", timeout=10_000)
    assert "comment must be a string" in page.inner_text("#signoff-error")
    assert page.get_attribute("#signoff-error", "role") == "alert"
    assert page.is_enabled("#signoff-button") and page.inner_text("#signoff-button") == label
    page.unroute(sign_off)

    # network down
    page.route(sign_off, lambda route: route.abort())
    page.click("#signoff-button")
    _until(page, "document.getElementById('signoff-error').innerText.includes('could not be reached')", 10)
    assert page.is_enabled("#signoff-button") and page.inner_text("#signoff-button") == label
    page.unroute(sign_off)

    # 409: someone else signs it off just before this click lands; the page says so and shows
    # the final state
    def other_first(route) -> None:
        assert client.post(f"/v1/analyses/{blast_id}/sign-off",
                           json={"signed_off_by": "Dr Other"}).status_code == 200
        route.continue_()

    page.route(sign_off, other_first)
    page.click("#signoff-button")
    page.wait_for_selector("#signoff-state .badge.final", timeout=10_000)
    _until(page, "document.getElementById('signoff-error').innerText.includes('Not signed off')", 10)
    assert page.locator("#signoff-error").count() == 1 and page.is_visible("#signoff-error")
    assert "Dr Other" in page.inner_text("#signoff-state")
    page.screenshot(path=str(ARTIFACTS / "mobile-signoff-409.png"), full_page=True)

    # a new blast alert: role=alert, a named Dismiss button reachable and visibly focused by keyboard
    client.post("/v1/analyses", data={"image": (io.BytesIO(cell_png("blast", 5)), "b.png")})
    page.wait_for_selector(".alert[role=alert]", timeout=120_000)
    page.focus(".brand")
    page.keyboard.press("Tab")  # the alert's "open" link
    page.keyboard.press("Tab")  # its Dismiss button
    assert page.evaluate("document.activeElement.closest('.alert') && document.activeElement.tagName") == "BUTTON"
    assert page.evaluate("document.activeElement.getAttribute('aria-label')").startswith("Dismiss alert for analysis")
    assert page.evaluate("parseFloat(getComputedStyle(document.activeElement).outlineWidth)") >= 3
    assert page.evaluate(_CONTRAST_JS, ".alert button") == []
    page.keyboard.press("Enter")
    assert page.locator(".alert").count() == 0
    assert page.evaluate("document.activeElement !== document.body")
    # only the three failures provoked above (the browser logs each failed request); no script errors
    assert len(console) == 3 and all(m.startswith("Failed to load resource") for m in console), console


def test_page_shows_reconnecting_and_catches_up(running_app, live_server, browser, cell_png) -> None:
    import waitress

    app = running_app
    client = app.test_client()
    server = live_server(app)
    port = server.server.effective_port
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#live.on", timeout=10_000)
    page.wait_for_selector("#analysis-rows td", timeout=10_000)

    channels = list(server.server._map.values())  # type: ignore[union-attr]
    server.close()  # the server stops (as a killed process would: its connections drop too)
    for channel in channels:
        with contextlib.suppress(OSError):
            channel.close()
    _until(page, "document.getElementById('live').innerText.includes('reconnecting')", 20)
    assert page.is_hidden("#live.on")
    # an analysis finishes while the page is cut off: its event is lost
    analysis_id = client.post("/v1/analyses", data={
        "image": (io.BytesIO(cell_png("normal", 1)), "n.png")}).get_json()["id"]
    _finished(client, analysis_id)

    again = waitress.create_server(app, host="127.0.0.1", port=port, threads=8)
    thread = threading.Thread(target=again.run, daemon=True)
    thread.start()
    try:  # the page reconnects by itself and reads the list again
        page.wait_for_selector("#live.on", timeout=30_000)
        page.wait_for_selector(f"tr.row[data-id='{analysis_id}']", timeout=10_000)
    finally:
        app.extensions["leuk_fhir"].broker.close()
        with contextlib.suppress(OSError, ValueError):
            again.close()
        thread.join(10)
