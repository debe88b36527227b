"""Fixtures for the adapters tests: generated inputs, the demo classifier, a real Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LEUK_FHIR_SHARED", REPO.parent / "shared"))
BCCD = SHARED / "datasets" / "bccd" / "BCCD"
PBC = SHARED / "datasets" / "pbc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"BCCD dataset not found at {BCCD}")
    return BCCD


@pytest.fixture(scope="session")
def pbc_cell() -> np.ndarray:
    """One real single-cell image (a PBC lymphocyte)."""
    files = sorted((PBC / "lymphocyte").glob("*"))
    if not files:
        pytest.skip(f"PBC dataset not found at {PBC}")
    return np.asarray(Image.open(files[0]).convert("RGB"))


@pytest.fixture(scope="session")
def bccd_field(bccd_root: Path) -> np.ndarray:
    return np.asarray(Image.open(bccd_root / "JPEGImages" / "BloodImage_00000.jpg").convert("RGB"))


@pytest.fixture(scope="session")
def classifier():
    """The real bundled demo model (leuk_fhir.model.load_classifier), loaded once."""
    from leuk_fhir.model import load_classifier

    return load_classifier(device="cpu")


@dataclass(frozen=True)
class OrthancServer:
    http_url: str
    dicom_port: int
    ae_title: str
    storage: Path

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"


def _orthanc_plugins() -> list[str]:
    for folder in (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc")):
        found = sorted(str(p) for p in folder.glob("libOrthancDicomWeb.so*"))
        if found:
            return [found[0]]
    return []


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Debian's Orthanc with the DICOMweb plugin, on loopback ports, in a temp directory."""
    binary = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    plugins = _orthanc_plugins()
    if binary is None or not plugins:
        pytest.skip(
            "Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "leuk-fhir-test-orthanc",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": False,
        "UnknownSopClassAccepted": True,
        "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "DicomModalities": {},
        "StableAge": 1,
        "ConcurrentJobs": 1,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=root
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/system", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not start within 60 s")
            time.sleep(0.3)
        yield OrthancServer(url, dicom_port, "ORTHANC", root / "storage")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
