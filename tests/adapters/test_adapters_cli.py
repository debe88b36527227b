"""The adapters CLI: inspect, analyze, pull, dicom-listen (run as real processes where it matters)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pynetdicom import AE

from leuk_fhir.adapters.synthetic import (
    dicom_microscopy_dataset,
    synthetic_smear_field,
    write_dicom_microscopy,
)
from leuk_fhir.cli import main

FIELD, _ = synthetic_smear_field(320, 240, white_cells=1, red_cells=8, cell_diameter=60, seed=17)


def test_inspect_prints_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_dicom_microscopy(tmp_path / "x.dcm", FIELD, patient_id="CLI-1")
    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["patient"]["identifier"] == "CLI-1" and doc["scope"] == "field"
    assert doc["levels"] == [{"width": 320, "height": 240, "downsample": 1.0}]
    assert doc["dicom"]["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.77.1.2"
    assert main(["inspect", "--plugins"]) == 0
    assert "openslide" in capsys.readouterr().out


def test_inspect_bad_file_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    assert main(["inspect", str(bad)]) == 3  # InputError exit code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leuk-fhir: error:")


def test_analyze_json_with_evidence(
    tmp_path: Path, bccd_root: Path, pbc_cell: np.ndarray, capsys, classifier
) -> None:
    Image.fromarray(pbc_cell).save(tmp_path / "cell.png")
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM")
    field = bccd_root / "JPEGImages" / "BloodImage_00000.jpg"
    code = main(["analyze", str(tmp_path / "cell.png"), str(field), str(bad), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 3 and doc["failed"] == 1
    cell, fld, err = doc["results"]
    assert (
        cell["scope"] == "cell"
        and cell["cells_total"] == 1
        and cell["cells"][0]["box"] == [0, 0, 360, 363]
    )
    assert (
        fld["scope"] == "field"
        and fld["cells_total"] >= 1
        and all(len(c["box"]) == 4 for c in fld["cells"])
    )
    assert fld["model"]["is_demo"] is True
    assert err["error"] == "invalid-image"


@pytest.mark.slow
def test_dicom_listen_process_receives_and_analyses(tmp_path: Path, free_tcp_port: int) -> None:
    cli = Path(sys.executable).with_name("leuk-fhir")
    env = {
        **os.environ,
        "LEUK_FHIR_DATA_DIR": str(tmp_path / "data"),
        "LEUK_FHIR_MODEL_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [
            str(cli),
            "dicom-listen",
            "--dicom-port",
            str(free_tcp_port),
            "--ae-title",
            "LEUKTEST",
            "--allow",
            "SCOPE9",
            "--spool",
            str(tmp_path / "spool"),
            "--analyze",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # Started as `leuk-fhir dicom-listen &` from a script would be: SIGINT inherited as
        # ignored. The listener must still stop on it (and on SIGTERM).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        banner = proc.stderr.readline()
        assert "C-STORE SCP LEUKTEST" in banner, banner
        ds = dicom_microscopy_dataset(FIELD)
        ae = AE(ae_title="SCOPE9")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", free_tcp_port, ae_title="LEUKTEST")
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        line = json.loads(proc.stdout.readline())
        assert line["dicom"]["sop_instance_uid"] == ds.SOPInstanceUID
        assert line["dicom"]["calling_ae_title"] == "SCOPE9"
        assert line["findings"]["scope"] == "field" and "blast_percentage" in line["findings"]
        assert Path(line["received"]).is_file()
        assert pydicom.dcmread(line["received"]).SOPInstanceUID == ds.SOPInstanceUID
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{proc.stderr.read()}"


@pytest.mark.orthanc
def test_pull_command_against_orthanc(
    orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    import requests

    ds = dicom_microscopy_dataset(FIELD, accession_number="CLI-PULL")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    requests.post(
        f"{orthanc.http_url}/instances", data=buf.getvalue(), timeout=30
    ).raise_for_status()
    code = main(
        [
            "pull",
            "--dicomweb",
            orthanc.dicomweb_url,
            "--study",
            ds.StudyInstanceUID,
            "--spool",
            str(tmp_path),
            "--json",
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and len(doc["stored"]) == 1 and Path(doc["stored"][0]).is_file()


@pytest.mark.parametrize("port", ["-5", "70000", "eleven"])
def test_dicom_listen_rejects_a_bad_port_as_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dicom-listen", "--dicom-port", port])
    assert exc.value.code == 2
    assert "--dicom-port" in capsys.readouterr().err


def test_analyze_with_a_bad_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "leuk.toml"
    config.write_text('[model]\ndevice = "tpu"\n')
    assert main(["--config", str(config), "analyze", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "leuk-fhir: error: invalid value 'tpu' for model.device: "
        "must be one of auto | cpu | cuda | mps or e.g. cuda:0"
    ]
