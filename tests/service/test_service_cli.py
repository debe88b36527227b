"""`leuk-fhir serve`, `token` and `sample-image`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from leuk_fhir.cli import main
from leuk_fhir.service.store import ServiceStore


def test_token_create_list_revoke(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    assert main(["token", "create", "--role", "clinician", "--name", "Dr X", "--data-dir", str(data)]) == 0
    out = capsys.readouterr()
    clear = out.out.strip()
    assert clear.startswith("lfx_") and "shown once" in out.err
    store = ServiceStore(data / "service.sqlite3")
    token = store.find_token(clear)
    assert token is not None and token.role == "clinician" and token.name == "Dr X"
    assert main(["token", "list", "--data-dir", str(data)]) == 0
    listing = capsys.readouterr().out
    assert token.id in listing and clear not in listing
    assert main(["token", "revoke", token.id, "--data-dir", str(data)]) == 0
    assert store.find_token(clear) is None
    assert main(["token", "revoke", token.id, "--data-dir", str(data)]) == 1  # NotFoundError
    with pytest.raises(SystemExit):
        main(["token", "create", "--role", "root", "--name", "x", "--data-dir", str(data)])


@pytest.mark.parametrize("kind", ["blast", "normal", "field"])
def test_sample_image(tmp_path: Path, kind: str) -> None:
    out = tmp_path / f"{kind}.png"
    assert main(["sample-image", str(out), "--kind", kind]) == 0
    with Image.open(out) as image:
        assert image.mode == "RGB" and min(image.size) >= 64


def test_serve_refuses_to_listen_beyond_loopback_without_auth(tmp_path: Path, capsys) -> None:
    code = main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--no-dicom"])
    assert code == 2
    assert "--require-auth" in capsys.readouterr().err


@pytest.mark.slow
def _serve(data: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """`leuk-fhir serve` on ``data`` with extra ``LEUK_FHIR_*`` variables; its URL once up."""
    process = subprocess.Popen(
        [sys.executable, "-m", "leuk_fhir", "serve", "--port", "0", "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env},
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if match := re.search(r"serving (http://\S+?)/ ", line):
            return process, match.group(1)
    raise AssertionError("".join(lines))


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, which must end `serve` cleanly (exit 0) within 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_runs_on_embedded_defaults_and_stops_cleanly(tmp_path: Path) -> None:
    process, url = _serve(tmp_path / "d", LEUK_FHIR_DICOM_PORT="0")
    try:
        assert requests.get(f"{url}/healthz", timeout=5).json()["status"] == "ok"
        deadline = time.monotonic() + 120
        while (ready := requests.get(f"{url}/readyz", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        assert "dicom_listener" in ready.json()["checks"]
        assert "DEMO" in requests.get(f"{url}/", timeout=5).text
    finally:
        _stop(process)


@pytest.mark.slow
def test_a_study_acknowledged_before_a_crash_is_analysed_after_the_restart(tmp_path: Path) -> None:
    """`serve` in study mode acknowledges two instances, then is killed (SIGKILL) before the
    study goes idle. The next `serve` on the same data directory analyses that study."""
    import io
    import socket

    from pydicom import dcmread
    from pynetdicom import AE

    from leuk_fhir.adapters.synthetic import dicom_microscopy_dataset
    from leuk_fhir.model.synthetic import generate_cell

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "d"
    first = dicom_microscopy_dataset(generate_cell("blast", 1), patient_id="PAT-CRASH")
    second = dicom_microscopy_dataset(generate_cell("blast", 2), patient_id="PAT-CRASH",
                                      study_uid=first.StudyInstanceUID)
    study_mode = {"LEUK_FHIR_DICOM_PORT": str(port), "LEUK_FHIR_DICOM_ANALYSIS_UNIT": "study"}
    process, _ = _serve(data, **study_mode, LEUK_FHIR_DICOM_STUDY_IDLE_S="600")
    try:
        for ds in (first, second):
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            sent = dcmread(io.BytesIO(buffer.getvalue()))
            ae = AE(ae_title="SCOPE01")
            ae.add_requested_context(sent.SOPClassUID, sent.file_meta.TransferSyntaxUID)
            deadline = time.monotonic() + 60
            while not (assoc := ae.associate("127.0.0.1", port, ae_title="LEUKFHIR")).is_established:
                assert time.monotonic() < deadline, "the DICOM listener did not come up"
                time.sleep(0.2)
            try:
                assert int(assoc.send_c_store(sent).Status) == 0
            finally:
                assoc.release()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert ServiceStore(data / "service.sqlite3").list_analyses() == []  # never handed over

    process, url = _serve(data, **study_mode, LEUK_FHIR_DICOM_STUDY_IDLE_S="0.5")
    try:
        deadline = time.monotonic() + 120
        while True:
            body = requests.get(f"{url}/v1/analyses", timeout=5).json()
            items = body["analyses"]
            if items and items[0]["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.3)
        [analysis] = items
        assert analysis["status"] == "completed" and analysis["transport"] == "c-store", analysis
        assert analysis["outcome"] == "blasts-detected"
    finally:
        _stop(process)
    assert not list((data / "dicom-spool").rglob("*.dcm"))
