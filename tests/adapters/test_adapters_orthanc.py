"""Proven with a real peer: Debian's Orthanc pushes to our SCP over C-STORE, and our DICOMweb
client pulls studies (microscopy images and a whole slide) from it over QIDO-RS/WADO-RS."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from leuk_fhir.acquisition import DicomReference, Scope, Transport
from leuk_fhir.adapters import open_acquisition
from leuk_fhir.adapters.dicom_scp import CStoreReceiver
from leuk_fhir.adapters.dicomweb_pull import DicomWebError, pull_study
from leuk_fhir.adapters.synthetic import (
    dicom_microscopy_dataset,
    synthetic_smear_field,
    write_dicom_wsi,
)
from leuk_fhir.errors import NotFoundError
from leuk_fhir.settings import DicomSettings

pytestmark = pytest.mark.orthanc

FIELD, _ = synthetic_smear_field(320, 240, white_cells=1, red_cells=8, cell_diameter=60, seed=13)


def _upload(orthanc, data: bytes) -> str:
    r = requests.post(f"{orthanc.http_url}/instances", data=data, timeout=30)
    r.raise_for_status()
    return str(r.json()["ID"])


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_orthanc_pushes_instances_to_our_scp(orthanc, tmp_path: Path) -> None:
    got: list[tuple[Path, DicomReference]] = []
    done = threading.Event()

    def on_instance(path: Path, ref: DicomReference) -> None:
        got.append((path, ref))
        if len(got) == 2:
            done.set()

    settings = DicomSettings(port=0, ae_title="LEUKFHIR", allowed_calling_aes=("ORTHANC",))
    with CStoreReceiver(settings, tmp_path / "spool", on_instance) as rx:
        r = requests.put(
            f"{orthanc.http_url}/modalities/leuk",
            json={"AET": "LEUKFHIR", "Host": "127.0.0.1", "Port": rx.port},
            timeout=10,
        )
        r.raise_for_status()
        echo = requests.post(f"{orthanc.http_url}/modalities/leuk/echo", data="{}", timeout=30)
        assert echo.status_code == 200
        sent = [
            dicom_microscopy_dataset(FIELD, transfer_syntax=JPEGBaseline8Bit, patient_id="ORTH-1"),
            dicom_microscopy_dataset(FIELD, transfer_syntax=JPEG2000Lossless, patient_id="ORTH-1"),
        ]
        ids = [_upload(orthanc, _bytes(ds)) for ds in sent]
        store = requests.post(
            f"{orthanc.http_url}/modalities/leuk/store",
            json={"Resources": ids, "Synchronous": True},
            timeout=60,
        )
        assert store.status_code == 200, store.text
        assert done.wait(30)
    by_uid = {ref.sop_instance_uid: (path, ref) for path, ref in got}
    for ds in sent:
        path, ref = by_uid[ds.SOPInstanceUID]
        assert ref.calling_ae_title == "ORTHANC" and ref.study_uid == ds.StudyInstanceUID
        acq = open_acquisition(path, transport=Transport.C_STORE)
        assert acq.patient.identifier == "ORTH-1"
        tolerance = 6 if ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit else 0
        assert np.abs(acq.pixels.read_frame().astype(int) - FIELD).mean() <= tolerance


def test_orthanc_push_of_unsupported_sop_class_fails(orthanc, tmp_path: Path) -> None:
    got: list = []
    ct = dicom_microscopy_dataset(FIELD)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    ct_id = _upload(orthanc, _bytes(ct))
    with CStoreReceiver(DicomSettings(port=0), tmp_path, lambda p, r: got.append(p)) as rx:
        requests.put(
            f"{orthanc.http_url}/modalities/leuk2",
            json={"AET": "LEUKFHIR", "Host": "127.0.0.1", "Port": rx.port},
            timeout=10,
        ).raise_for_status()
        store = requests.post(
            f"{orthanc.http_url}/modalities/leuk2/store",
            json={"Resources": [ct_id], "Synchronous": True},
            timeout=60,
        )
    assert store.status_code >= 400 and got == []
    assert not list(tmp_path.rglob("*.dcm"))


def test_pull_study_over_dicomweb(orthanc, tmp_path: Path) -> None:
    first = dicom_microscopy_dataset(
        FIELD, transfer_syntax=JPEG2000Lossless, accession_number="PULL-1"
    )
    second = dicom_microscopy_dataset(
        FIELD[::-1], study_uid=first.StudyInstanceUID, accession_number="PULL-1"
    )
    report = dicom_microscopy_dataset(FIELD, study_uid=first.StudyInstanceUID)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    for ds in (first, second, report):
        _upload(orthanc, _bytes(ds))
    pulled = pull_study(orthanc.dicomweb_url, first.StudyInstanceUID, tmp_path / "spool")
    assert {ref.sop_instance_uid for _, ref in pulled.stored} == {
        first.SOPInstanceUID,
        second.SOPInstanceUID,
    }
    assert [uid for uid, _ in pulled.skipped] == [report.SOPInstanceUID]
    stored = dict((ref.sop_instance_uid, path) for path, ref in pulled.stored)
    # the stored transfer syntax is kept (transfer-syntax=*), pixels are intact
    kept = pydicom.dcmread(stored[first.SOPInstanceUID], stop_before_pixels=True)
    assert kept.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(open_acquisition(stored[first.SOPInstanceUID]).pixels.read_frame(), FIELD)
    study = open_acquisition(pulled.study_dir, transport=Transport.DICOMWEB_PULL)
    assert study.pixels.frame_count == 2 and study.dicom.accession_number == "PULL-1"


def test_pull_whole_slide_over_dicomweb(orthanc, tmp_path: Path) -> None:
    plane, _ = synthetic_smear_field(
        1024, 768, white_cells=4, red_cells=60, cell_diameter=90, seed=3
    )
    paths = write_dicom_wsi(tmp_path / "made", plane, tile_size=256, levels=2)
    for p in paths:
        _upload(orthanc, p.read_bytes())
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    pulled = pull_study(orthanc.dicomweb_url, study_uid, tmp_path / "spool")
    assert len(pulled.stored) == 2
    acq = open_acquisition(pulled.study_dir)
    assert acq.scope == Scope.SLIDE and [lv.width for lv in acq.pixels.levels] == [1024, 512]
    assert (
        np.abs(
            acq.pixels.read_region(256, 256, 256, 256).astype(int) - plane[256:512, 256:512]
        ).mean()
        < 6
    )


def test_pull_errors_are_clear(orthanc, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no instances"):
        pull_study(orthanc.dicomweb_url, "1.2.3.4.5.6.7.8.9", tmp_path)
    with pytest.raises(DicomWebError, match="cannot reach|failed"):
        pull_study("http://127.0.0.1:9/dicom-web", "1.2.3", tmp_path, timeout_s=3, attempts=1)
