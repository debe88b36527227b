"""DICOM microscopy files: every transfer syntax, single and multi-frame, metadata, bad input."""

from __future__ import annotations

import logging
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit

from leuk_fhir.acquisition import Scope
from leuk_fhir.adapters import open_acquisition, sniff_format
from leuk_fhir.adapters.dicom_metadata import VL_MICROSCOPIC, VL_SLIDE_COORDINATES_MICROSCOPIC
from leuk_fhir.adapters.plugins import all_statuses, require_transfer_syntax
from leuk_fhir.adapters.synthetic import (
    LOSSY_TRANSFER_SYNTAXES,
    SYNTHETIC_TRANSFER_SYNTAXES,
    damage_first_jpeg_frame,
    dicom_microscopy_dataset,
    synthetic_smear_field,
    write_dicom_microscopy,
    write_with_malformed_integer,
)
from leuk_fhir.errors import ImageTooLargeError, InvalidImageError, UnsupportedFormatError
from leuk_fhir.settings import ImageSettings

FIELD, _ = synthetic_smear_field(320, 240, white_cells=1, red_cells=8, cell_diameter=60, seed=5)


@pytest.mark.parametrize("ts", SYNTHETIC_TRANSFER_SYNTAXES, ids=lambda t: t.keyword or str(t))
@pytest.mark.parametrize("frames", [1, 3])
def test_every_transfer_syntax_decodes_frame_by_frame(tmp_path: Path, ts: str, frames: int) -> None:
    stack = [np.roll(FIELD, 7 * i, axis=1) for i in range(frames)]
    path = write_dicom_microscopy(
        tmp_path / "img", stack if frames > 1 else stack[0], transfer_syntax=ts
    )
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    acq = open_acquisition(path)
    assert acq.pixels.frame_count == frames
    tolerance = 6.0 if ts in LOSSY_TRANSFER_SYNTAXES else 0.0
    for i in range(frames):
        decoded = acq.pixels.read_frame(i)
        assert decoded.shape == FIELD.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(int) - stack[i]).mean() <= tolerance, f"frame {i}"


def test_metadata_fills_the_neutral_record(tmp_path: Path) -> None:
    path = write_dicom_microscopy(
        tmp_path / "meta.bin",
        FIELD,
        sop_class=VL_SLIDE_COORDINATES_MICROSCOPIC,
        patient_id="MRN-77",
        patient_name="Curie^Marie",
        accession_number="A-9",
    )
    assert sniff_format(path) == "dicom"
    acq = open_acquisition(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert acq.source_id == ds.SOPInstanceUID
    assert acq.patient.identifier == "MRN-77" and acq.patient.name == "Curie^Marie"
    assert acq.patient.birth_date == date(1980, 2, 14) and acq.patient.sex == "F"
    assert acq.patient.identifier_system == "urn:leuk-fhir:test-hospital"
    assert acq.dicom is not None
    assert (
        acq.dicom.study_uid == ds.StudyInstanceUID and acq.dicom.series_uid == ds.SeriesInstanceUID
    )
    assert acq.dicom.sop_class_uid == VL_SLIDE_COORDINATES_MICROSCOPIC
    assert acq.dicom.accession_number == "A-9" and acq.dicom.modality == "SM"
    assert acq.specimen.identifier == "SLIDE-A-9" and acq.specimen.stain == "Wright-Giemsa stain"
    assert acq.specimen.type == "peripheral blood smear"
    assert (
        acq.device.manufacturer == "Synthetic Microscopes Ltd"
        and acq.device.serial_number == "SN-0042"
    )
    assert acq.device.model == "SynthScope 3000" and acq.device.software_versions
    assert acq.acquired_at == datetime(2026, 1, 15, 9, 30)
    assert acq.media_type == "application/dicom"
    assert acq.pixels.microns_per_pixel == pytest.approx(0.25)
    # 320 px at 0.25 um = 80 um: a field, not one cell
    assert acq.scope == Scope.FIELD


def test_small_dicom_with_spacing_is_one_cell(tmp_path: Path, pbc_cell: np.ndarray) -> None:
    path = write_dicom_microscopy(tmp_path / "cell.dcm", pbc_cell, pixel_spacing_um=0.07)
    assert open_acquisition(path).scope == Scope.CELL  # 363 px * 0.07 um = 25 um


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_not_dicom_and_truncated_dicom_are_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(InvalidImageError):
        open_acquisition(fake)
    good = write_dicom_microscopy(tmp_path / "good.dcm", FIELD)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidImageError, match="truncated|corrupt|Pixel Data"):
            open_acquisition(path).pixels.read_frame()
    jpeg = write_dicom_microscopy(
        tmp_path / "j.dcm", [FIELD, FIELD], transfer_syntax=JPEGBaseline8Bit
    ).read_bytes()
    (tmp_path / "jcut.dcm").write_bytes(jpeg[: len(jpeg) - 3000])
    with pytest.raises(InvalidImageError):
        acq = open_acquisition(tmp_path / "jcut.dcm")
        acq.pixels.read_frame(1)


def test_dicom_without_pixel_data_is_refused(tmp_path: Path) -> None:
    ds = dicom_microscopy_dataset(FIELD)
    del ds.PixelData
    path = tmp_path / "nopix.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidImageError, match=r"no Pixel Data \(7FE0,0010\)"):
        open_acquisition(path)


def test_unsupported_sop_class_names_the_uid(tmp_path: Path) -> None:
    ds = dicom_microscopy_dataset(FIELD)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    with pytest.raises(
        UnsupportedFormatError, match=r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.2 \(CT Image Storage\)"
    ):
        open_acquisition(tmp_path / "ct.dcm")


def test_unsupported_transfer_syntax_names_the_uid(tmp_path: Path) -> None:
    ds = dicom_microscopy_dataset(FIELD)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(96)])
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    with pytest.raises(UnsupportedFormatError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        open_acquisition(tmp_path / "mpeg.dcm")
    with pytest.raises(UnsupportedFormatError, match="1.2.3.4.5"):
        require_transfer_syntax("1.2.3.4.5")


def test_frame_dimensions_beyond_limit_are_refused(tmp_path: Path) -> None:
    path = write_dicom_microscopy(
        tmp_path / "big.dcm", FIELD, transfer_syntax=ExplicitVRLittleEndian
    )
    with pytest.raises(ImageTooLargeError, match="320 x 240"):
        open_acquisition(path, image_settings=ImageSettings(max_pixels=50_000))


def test_plugins_report_availability_and_install_hint() -> None:
    statuses = {s.name: s for s in all_statuses()}
    assert statuses["openslide"].available and statuses["wsidicom"].available
    for s in statuses.values():
        assert s.install_hint.startswith("pip install ")
    assert all(s.available for name, s in statuses.items() if name.startswith("dicom-"))
    assert VL_MICROSCOPIC  # accepted SOP class constant is exported


# -- audit fixes -------------------------------------------------------------------------


def _deflated(path: Path, side: int, frames: int, padding: int = 0) -> Path:
    """A Deflated instance of zeros: ``side``² RGB x ``frames`` declared, plus ``padding``
    bytes in a private element; a few KB on disk whatever it inflates to."""
    ds = dicom_microscopy_dataset(np.zeros((8, 8, 3), np.uint8))
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(side * side * 3 * frames)
    if padding:
        ds.private_block(0x0099, "LEUK TEST", create=True).add_new(0x01, "OB", bytes(padding))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("side", "frames", "padding", "message"),
    [(1500, 4, 0, "bytes declared"), (8, 1, 30_000_000, "inflates to more than")],
    ids=["declared-pixels", "inflated-size"],
)
def test_deflate_bomb_is_refused_with_bounded_memory(
    tmp_path: Path, side: int, frames: int, padding: int, message: str
) -> None:
    import tracemalloc

    path = _deflated(tmp_path / "bomb.dcm", side, frames, padding)
    assert path.stat().st_size < 200_000  # 27 MB / 30 MB inflated
    limit = ImageSettings(max_bytes=5_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=message):
            open_acquisition(path, image_settings=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit.max_bytes, f"peak {peak:,} bytes"


def test_deflated_instance_within_limits_reads_from_memory_once(tmp_path: Path) -> None:
    path = write_dicom_microscopy(
        tmp_path / "d.dcm", [FIELD, FIELD[::-1]], transfer_syntax=DeflatedExplicitVRLittleEndian
    )
    acq = open_acquisition(path, image_settings=ImageSettings(max_bytes=1_000_000))
    assert np.array_equal(acq.pixels.read_frame(1), FIELD[::-1])


def test_native_dicom_above_max_bytes_is_refused(tmp_path: Path) -> None:
    path = write_dicom_microscopy(tmp_path / "n.dcm", FIELD)  # 230 KB of native pixels
    with pytest.raises(ImageTooLargeError, match="image.max_bytes"):
        open_acquisition(path, image_settings=ImageSettings(max_bytes=100_000))


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
@pytest.mark.parametrize("value", ["abc", "-3"])
def test_malformed_number_of_frames_is_a_typed_error(tmp_path: Path, value: str) -> None:
    path = write_with_malformed_integer(
        dicom_microscopy_dataset(FIELD), "NumberOfFrames", value, tmp_path / "nf.dcm"
    )
    with pytest.raises(InvalidImageError, match="NumberOfFrames"):
        open_acquisition(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_malformed_instance_number_only_orders_last(tmp_path: Path) -> None:
    first = dicom_microscopy_dataset(FIELD)
    write_with_malformed_integer(
        dicom_microscopy_dataset(FIELD[::-1], study_uid=first.StudyInstanceUID,
                                 series_uid=first.SeriesInstanceUID),
        "InstanceNumber", "x1", tmp_path / "a.dcm",
    )  # fmt: skip
    first.InstanceNumber = 7
    first.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    acq = open_acquisition(tmp_path)
    assert acq.pixels.frame_count == 2
    assert np.array_equal(acq.pixels.read_frame(1), FIELD[::-1])


def test_study_folder_never_mixes_patients_or_unidentified_studies(tmp_path: Path) -> None:
    a = dicom_microscopy_dataset(FIELD, patient_id="PAT-C")
    b = dicom_microscopy_dataset(FIELD, patient_id="PAT-D", study_uid=a.StudyInstanceUID)
    for folder, pair in (("mixed", (a, b)), ("nostudy", (a.copy(), b.copy()))):
        (tmp_path / folder).mkdir()
        for i, ds in enumerate(pair):
            if folder == "nostudy":
                del ds.StudyInstanceUID
                ds.PatientID = "PAT-C"
            ds.save_as(tmp_path / folder / f"{i}.dcm", enforce_file_format=True)
    with pytest.raises(InvalidImageError, match="different patients or studies"):
        open_acquisition(tmp_path / "mixed")
    with pytest.raises(InvalidImageError, match="without Study Instance UID"):
        open_acquisition(tmp_path / "nostudy")


@pytest.mark.parametrize("keep_headers", [True, False], ids=["zeroed-scan", "not-jpeg"])
def test_corrupt_jpeg_frame_is_refused_not_decoded_to_garbage(
    tmp_path: Path, keep_headers: bool
) -> None:
    ds = damage_first_jpeg_frame(
        dicom_microscopy_dataset(FIELD, transfer_syntax=JPEGBaseline8Bit), keep_headers=keep_headers
    )
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    with pytest.raises(InvalidImageError, match="frame 0 could not be decoded"):
        open_acquisition(tmp_path / "bad.dcm").pixels.read_frame(0)


def test_a_bad_frame_is_one_typed_error_not_a_logged_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = damage_first_jpeg_frame(
        dicom_microscopy_dataset(FIELD, transfer_syntax=JPEGBaseline8Bit), keep_headers=True
    )
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    caplog.set_level(logging.INFO)
    with pytest.raises(InvalidImageError, match=r"(?s)frame 0 could not be decoded: .*pillow"):
        open_acquisition(tmp_path / "bad.dcm").pixels.read_frame(0)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("pydicom")]
    assert "Traceback" not in caplog.text


def test_native_ybr_full_422_decodes(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    ybr = convert_color_space(FIELD, "RGB", "YBR_FULL")
    y = ybr[:, :, 0].reshape(FIELD.shape[0], -1, 2)
    packed = np.stack([y[:, :, 0], y[:, :, 1], ybr[:, 0::2, 1], ybr[:, 0::2, 2]], axis=-1)
    ds = dicom_microscopy_dataset(FIELD)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.astype(np.uint8).tobytes()
    ds.save_as(tmp_path / "ybr.dcm", enforce_file_format=True)
    decoded = open_acquisition(tmp_path / "ybr.dcm").pixels.read_frame()
    assert np.abs(decoded.astype(int) - FIELD).mean() < 6  # chroma shared by pixel pairs


@pytest.mark.parametrize("spacing_um", [-0.25, 250.0])
def test_implausible_pixel_spacing_is_ignored(
    tmp_path: Path, spacing_um: float, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_dicom_microscopy(tmp_path / "s.dcm", FIELD, pixel_spacing_um=spacing_um)
    acq = open_acquisition(path)
    assert acq.pixels.microns_per_pixel is None and acq.scope == Scope.CELL  # 320 px
    assert "not plausible" in caplog.text


def test_dicomdir_in_a_study_folder_is_skipped(tmp_path: Path) -> None:
    from pydicom.dataset import FileMetaDataset

    a = dicom_microscopy_dataset(FIELD)
    b = dicom_microscopy_dataset(FIELD[::-1], study_uid=a.StudyInstanceUID)
    a.save_as(tmp_path / "IM1", enforce_file_format=True)
    b.save_as(tmp_path / "IM2", enforce_file_format=True)
    index = pydicom.Dataset()
    index.FileSetID, index.DirectoryRecordSequence = "CD", []
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    acq = open_acquisition(tmp_path)
    assert acq.pixels.frame_count == 2 and acq.source_id == a.StudyInstanceUID
