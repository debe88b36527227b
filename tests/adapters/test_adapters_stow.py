"""STOW-RS: multipart parsing, per-instance validation and spooling, the response data set."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from leuk_fhir.adapters.stow import build_stow_body, handle_stow, parse_stow
from leuk_fhir.adapters.synthetic import dicom_microscopy_dataset, synthetic_smear_field
from leuk_fhir.errors import InputError, UnsupportedFormatError

FIELD, _ = synthetic_smear_field(200, 160, white_cells=1, red_cells=4, cell_diameter=50, seed=4)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_all_instances_stored_200(tmp_path: Path) -> None:
    a = dicom_microscopy_dataset(FIELD)
    b = dicom_microscopy_dataset(FIELD, study_uid=a.StudyInstanceUID)
    body, ctype = build_stow_body([_bytes(a), _bytes(b)])
    result = handle_stow(body, ctype, spool_dir=tmp_path)
    assert result.http_status == 200 and len(result.stored) == 2 and not result.failed
    for stored, ds in zip(result.stored, (a, b), strict=True):
        assert stored.path.read_bytes() == _bytes(ds)
        assert stored.reference.sop_instance_uid == ds.SOPInstanceUID
    doc = result.to_dicom_json("http://127.0.0.1:8000/dicomweb")
    refs = doc["00081199"]["Value"]
    assert [r["00081155"]["Value"][0] for r in refs] == [a.SOPInstanceUID, b.SOPInstanceUID]
    assert refs[0]["00081150"]["Value"][0] == a.SOPClassUID
    assert doc["00081190"]["Value"][0].endswith(f"/studies/{a.StudyInstanceUID}")
    assert "00081198" not in doc


def test_mixed_batch_202_with_failed_sop_sequence(tmp_path: Path) -> None:
    good = dicom_microscopy_dataset(FIELD)
    nopix = dicom_microscopy_dataset(FIELD)
    del nopix.PixelData
    ct = dicom_microscopy_dataset(FIELD)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    body, ctype = build_stow_body([_bytes(good), _bytes(nopix), _bytes(ct), b"not dicom at all"])
    result = handle_stow(body, ctype, spool_dir=tmp_path)
    assert result.http_status == 202
    assert [s.reference.sop_instance_uid for s in result.stored] == [good.SOPInstanceUID]
    reasons = {f.sop_instance_uid: f.failure_reason for f in result.failed}
    assert reasons == {nopix.SOPInstanceUID: 0xC000, ct.SOPInstanceUID: 0xA900, None: 0xC000}
    failed = result.to_dicom_json()["00081198"]["Value"]
    assert {item["00081197"]["Value"][0] for item in failed} == {0xC000, 0xA900}
    assert [p.name for p in tmp_path.rglob("*.dcm")] == [f"{good.SOPInstanceUID}.dcm"]


def test_study_in_url_must_match(tmp_path: Path) -> None:
    ds = dicom_microscopy_dataset(FIELD)
    body, ctype = build_stow_body([_bytes(ds)])
    result = handle_stow(body, ctype, spool_dir=tmp_path, study_uid="1.2.3.4")
    assert result.http_status == 409 and result.failed[0].failure_reason == 0xA900


def test_wrong_media_type_415_and_malformed_body_400(tmp_path: Path) -> None:
    ds = dicom_microscopy_dataset(FIELD)
    body, ctype = build_stow_body([_bytes(ds)])
    with pytest.raises(UnsupportedFormatError) as exc:
        parse_stow(body, "application/dicom")
    assert exc.value.http_status == 415
    with pytest.raises(UnsupportedFormatError, match="application/dicom\\+xml"):
        parse_stow(body, 'multipart/related; type="application/dicom+xml"; boundary=x')
    with pytest.raises(InputError, match="no boundary"):
        parse_stow(body, 'multipart/related; type="application/dicom"')
    with pytest.raises(InputError, match="truncated"):
        parse_stow(body[: len(body) // 2], ctype)
    with pytest.raises(InputError) as bad:
        parse_stow(b"--other\r\n\r\nxx\r\n--other--", ctype)
    assert bad.value.http_status == 400
    assert not list(tmp_path.iterdir())


def test_parts_without_headers_and_quoted_boundary() -> None:
    payload = b"\x00" * 128 + b"DICM" + b"\r\n--notboundary\r\n"
    body = b"preamble\r\n--b0undary\r\n\r\n" + payload + b"\r\n--b0undary--\r\n"
    request = parse_stow(body, 'multipart/related; boundary="b0undary"; type="application/dicom"')
    assert len(request.parts) == 1 and request.parts[0].data == payload
    assert request.parts[0].content_type == "application/dicom"


def test_unfileable_or_undecodable_parts_fail_and_nothing_is_overwritten(tmp_path: Path) -> None:
    from pydicom.uid import JPEGBaseline8Bit

    from leuk_fhir.adapters.synthetic import damage_first_jpeg_frame

    kept = dicom_microscopy_dataset(FIELD, patient_id="PAT-A")
    assert handle_stow(*build_stow_body([_bytes(kept)]), spool_dir=tmp_path).http_status == 200
    other = dicom_microscopy_dataset(
        FIELD[::-1], patient_id="PAT-B", study_uid=kept.StudyInstanceUID
    )
    other.SOPInstanceUID = kept.SOPInstanceUID
    nostudy = dicom_microscopy_dataset(FIELD)
    del nostudy.StudyInstanceUID
    corrupt = damage_first_jpeg_frame(
        dicom_microscopy_dataset(FIELD, transfer_syntax=JPEGBaseline8Bit)
    )
    body, ctype = build_stow_body([_bytes(other), _bytes(nostudy), _bytes(corrupt), _bytes(kept)])
    result = handle_stow(body, ctype, spool_dir=tmp_path)
    assert result.http_status == 202 and len(result.stored) == 1  # the identical re-send
    messages = [f.message for f in result.failed]
    assert "other content" in messages[0] and "Study Instance UID" in messages[1]
    assert "could not be decoded" in messages[2]
    assert result.stored[0].path.read_bytes() == _bytes(kept)


def test_a_full_disk_fails_each_instance_out_of_resources(small_disk) -> None:
    """The spool on a full file system (a real tmpfs): each instance fails with reason 0xA700
    (out of resources, to be sent again), no half-written file is left, and once space is
    free the same request stores them."""
    a = dicom_microscopy_dataset(FIELD)
    b = dicom_microscopy_dataset(FIELD, study_uid=a.StudyInstanceUID)
    body, ctype = build_stow_body([_bytes(a), _bytes(b)])
    spool = small_disk.path / "spool"
    small_disk.fill(leave=8 * 1024)
    result = handle_stow(body, ctype, spool_dir=spool)
    assert result.stored == [] and {f.failure_reason for f in result.failed} == {0xA700}
    assert all("no space left" in f.message and str(spool) not in f.message for f in result.failed)
    assert not [p for p in spool.rglob("*") if p.is_file()]
    small_disk.free()
    assert len(handle_stow(body, ctype, spool_dir=spool).stored) == 2
