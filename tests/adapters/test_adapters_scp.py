"""The C-STORE SCP against real SCUs on loopback: pynetdicom and dcmtk's storescu."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless
from pynetdicom import AE

from leuk_fhir.acquisition import DicomReference, Scope, Transport
from leuk_fhir.adapters import open_acquisition
from leuk_fhir.adapters.dicom_scp import VERIFICATION, CStoreReceiver
from leuk_fhir.adapters.synthetic import (
    damage_first_jpeg_frame,
    dicom_microscopy_dataset,
    synthetic_smear_field,
    write_dicom_microscopy,
    write_with_malformed_integer,
)
from leuk_fhir.errors import QueueFullError
from leuk_fhir.settings import DicomSettings, ImageSettings

FIELD, _ = synthetic_smear_field(320, 240, white_cells=1, red_cells=8, cell_diameter=60, seed=9)


class Received:
    """Collects on_instance calls (thread-safe) and lets a test wait for them."""

    def __init__(self) -> None:
        self.items: list[tuple[Path, DicomReference]] = []
        self.event = threading.Event()

    def __call__(self, path: Path, ref: DicomReference) -> None:
        assert path.exists(), "callback must only see complete, renamed files"
        self.items.append((path, ref))
        self.event.set()


def _send(
    ds: pydicom.Dataset, port: int, calling: str = "SCOPE1", *, echo: bool = False
) -> tuple[int | None, str | None]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="LEUKFHIR")
    assert assoc.is_established
    try:
        if echo:
            assert assoc.send_c_echo().Status == 0
        status = assoc.send_c_store(ds)
        return int(status.Status), status.get("ErrorComment")
    finally:
        assoc.release()


@pytest.fixture
def receiver(tmp_path: Path):
    got = Received()
    rx = CStoreReceiver(
        DicomSettings(port=0, allowed_calling_aes=("SCOPE1", "STORESCU")), tmp_path / "spool", got
    )
    rx.start()
    yield rx, got
    rx.stop()


def test_store_spools_durably_then_calls_back(receiver, tmp_path: Path) -> None:
    rx, got = receiver
    path = write_dicom_microscopy(tmp_path / "in.dcm", FIELD, transfer_syntax=JPEGBaseline8Bit)
    ds = pydicom.dcmread(path)
    status, _ = _send(ds, rx.port, echo=True)
    assert status == 0x0000
    assert len(got.items) == 1
    spooled, ref = got.items[0]
    assert spooled == tmp_path / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert ref.calling_ae_title == "SCOPE1" and ref.sop_instance_uid == ds.SOPInstanceUID
    assert list((spooled.parent / ".incoming").iterdir()) == []  # no half-written leftovers
    acq = open_acquisition(
        spooled, transport=Transport.C_STORE, calling_ae_title=ref.calling_ae_title
    )
    assert acq.dicom is not None and acq.dicom.calling_ae_title == "SCOPE1"
    assert acq.pixels.read_frame().shape == FIELD.shape and acq.scope == Scope.FIELD
    assert rx.stats["stored"] == 1


def test_stop_does_not_wait_for_a_peer_that_never_releases(tmp_path: Path) -> None:
    import time

    rx = CStoreReceiver(DicomSettings(port=0), tmp_path, Received())
    rx.start()
    ae = AE(ae_title="SCOPE1")
    ae.add_requested_context(VERIFICATION)
    ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="LEUKFHIR")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    start = time.monotonic()
    rx.stop()  # the association is still open
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


def test_unknown_calling_ae_title_is_rejected(receiver) -> None:
    rx, got = receiver
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="LEUKFHIR")
    assert assoc.is_rejected and not assoc.is_established
    assert got.items == []


def test_instance_without_pixel_data_gets_error_status(receiver) -> None:
    rx, got = receiver
    ds = dicom_microscopy_dataset(FIELD)
    del ds.PixelData
    status, comment = _send(ds, rx.port)
    assert status == 0xC000 and "no Pixel Data" in comment
    assert got.items == [] and rx.stats["refused"] == 1
    assert not any(p.suffix == ".dcm" for p in rx.spool_dir.rglob("*"))


def test_oversized_instance_refused_out_of_resources(tmp_path: Path) -> None:
    got = Received()
    with CStoreReceiver(
        DicomSettings(port=0), tmp_path, got, image_settings=ImageSettings(max_pixels=10_000)
    ) as rx:
        status, comment = _send(dicom_microscopy_dataset(FIELD), rx.port)
    assert status == 0xA700 and "above the limit" in comment and got.items == []


def test_unsupported_sop_class_is_not_negotiated(receiver) -> None:
    rx, _ = receiver
    ae = AE(ae_title="SCOPE1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)  # CT
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="LEUKFHIR")
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert "1.2.840.10008.5.1.4.1.1.2" not in accepted and VERIFICATION in accepted
    finally:
        assoc.release()


def test_callback_failure_is_reported_but_file_kept(tmp_path: Path) -> None:
    def full(path: Path, ref: DicomReference) -> None:
        raise QueueFullError("analysis queue is full")

    with CStoreReceiver(DicomSettings(port=0), tmp_path, full) as rx:
        ds = dicom_microscopy_dataset(FIELD)
        status, comment = _send(ds, rx.port)
    assert status == 0xA700 and "queue is full" in comment
    assert (tmp_path / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm").exists()


def test_study_mode_calls_back_once_per_study(tmp_path: Path) -> None:
    got = Received()
    settings = DicomSettings(port=0, analysis_unit="study", study_idle_s=0.5)
    first = dicom_microscopy_dataset(FIELD)
    second = dicom_microscopy_dataset(
        FIELD[:, ::-1], study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID
    )
    second.InstanceNumber = 2
    with CStoreReceiver(settings, tmp_path, got) as rx:
        assert _send(first, rx.port)[0] == 0 and _send(second, rx.port)[0] == 0
        assert got.event.wait(10)
    assert len(got.items) == 1
    folder, ref = got.items[0]
    assert (
        folder.is_dir() and ref.study_uid == first.StudyInstanceUID and ref.sop_instance_uid is None
    )
    acq = open_acquisition(folder)
    assert acq.pixels.frame_count == 2 and acq.source_id == first.StudyInstanceUID
    assert np.array_equal(acq.pixels.read_frame(1), FIELD[:, ::-1])


@pytest.mark.skipif(
    shutil.which("storescu") is None, reason="dcmtk storescu not installed (apt-get install dcmtk)"
)
def test_dcmtk_storescu_as_peer(receiver, tmp_path: Path) -> None:
    rx, got = receiver
    path = write_dicom_microscopy(tmp_path / "ls.dcm", FIELD, transfer_syntax=JPEGLSLossless)
    echo = subprocess.run(
        ["echoscu", "-aet", "STORESCU", "-aec", "LEUKFHIR", "127.0.0.1", str(rx.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    run = subprocess.run(
        [
            "storescu",
            "-xt",
            "-aet",
            "STORESCU",
            "-aec",
            "LEUKFHIR",
            "127.0.0.1",
            str(rx.port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert len(got.items) == 1 and got.items[0][1].calling_ae_title == "STORESCU"
    assert np.array_equal(open_acquisition(got.items[0][0]).pixels.read_frame(), FIELD)
    bad = subprocess.run(
        [
            "storescu",
            "-xt",
            "-aet",
            "NOTALLOWED",
            "-aec",
            "LEUKFHIR",
            "127.0.0.1",
            str(rx.port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "Rejected" in (bad.stderr + bad.stdout)


# -- audit fixes: bombs, lost and merged instances, undecodable data -----------------------


def _send_raw(
    port: int, ds: pydicom.Dataset, command_uid: str, ts: str = ExplicitVRLittleEndian
) -> tuple[int, str | None]:
    """A C-STORE whose command names ``command_uid``, whatever the data set holds (a buggy
    modality); pynetdicom's own send_c_store refuses such data sets."""
    import time
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_primitives import C_STORE

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    ae = AE(ae_title="SCOPE1")
    ae.add_requested_context(ds.SOPClassUID, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="LEUKFHIR")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, command_uid
        req.DataSet = BytesIO(fp.getvalue())
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None
        return int(rsp.Status), getattr(rsp, "ErrorComment", None)
    finally:
        assoc.release()


def _send_file(path: Path, port: int) -> tuple[int, str | None]:
    """Send a Part 10 file as encoded (pynetdicom streams it without decoding it)."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title="SCOPE1")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="LEUKFHIR")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status), status.get("ErrorComment")
    finally:
        assoc.release()


def _spooled(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*.dcm") if ".incoming" not in p.parts)


def test_deflated_bomb_refused_before_inflating(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dicom_microscopy_dataset(np.zeros((8, 8, 3), np.uint8))
    ds.Rows = ds.Columns = 600
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(600 * 600 * 3 * 3)  # 3.2 MB inflated, a few KB deflated
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 50_000
    got = Received()
    settings = ImageSettings(max_bytes=1_000_000)
    with CStoreReceiver(
        DicomSettings(port=0), tmp_path / "spool", got, image_settings=settings
    ) as rx:
        status, comment = _send_file(path, rx.port)
    assert status == 0xA700 and "image.max_bytes" in comment
    assert got.items == [] and _spooled(tmp_path / "spool") == []


def test_instances_without_sop_uid_are_filed_under_the_command_uid(receiver) -> None:
    from pydicom.uid import generate_uid

    rx, got = receiver
    study, uids = generate_uid(), [generate_uid(), generate_uid()]
    for pid, uid in zip(("PAT-A", "PAT-B"), uids, strict=True):
        ds = dicom_microscopy_dataset(FIELD, patient_id=pid, study_uid=study)
        del ds.SOPInstanceUID
        assert _send_raw(rx.port, ds, uid) == (0x0000, None)
    files = _spooled(rx.spool_dir)
    assert [p.name for p in files] == sorted(f"{u}.dcm" for u in uids)  # none overwritten
    assert {pydicom.dcmread(p).PatientID for p in files} == {"PAT-A", "PAT-B"}
    assert sorted(ref.sop_instance_uid for _, ref in got.items) == sorted(uids)


def test_sop_uid_differing_from_the_command_is_refused(receiver) -> None:
    from pydicom.uid import generate_uid

    rx, got = receiver
    status, comment = _send_raw(rx.port, dicom_microscopy_dataset(FIELD), generate_uid())
    assert status == 0xC000 and "differs from the C-STORE request" in comment
    assert got.items == [] and _spooled(rx.spool_dir) == []


def test_other_content_under_a_received_sop_uid_is_refused_not_overwritten(receiver) -> None:
    rx, got = receiver
    first = dicom_microscopy_dataset(FIELD, patient_id="PAT-A")
    assert _send(first, rx.port)[0] == 0x0000
    assert _send(first, rx.port)[0] == 0x0000  # an identical re-send stays idempotent
    other = dicom_microscopy_dataset(
        FIELD[::-1], patient_id="PAT-B", study_uid=first.StudyInstanceUID
    )
    other.SOPInstanceUID = first.SOPInstanceUID
    status, comment = _send(other, rx.port)
    assert status == 0xC000 and "other content" in comment
    (kept,) = _spooled(rx.spool_dir)
    assert pydicom.dcmread(kept).PatientID == "PAT-A" and len(got.items) == 2


@pytest.mark.parametrize("unit", ["instance", "study"])
def test_instance_without_study_uid_is_refused_not_pooled(tmp_path: Path, unit: str) -> None:
    got = Received()
    settings = DicomSettings(port=0, analysis_unit=unit, study_idle_s=0.2)
    with CStoreReceiver(settings, tmp_path, got) as rx:
        for pid in ("PAT-C", "PAT-D"):
            ds = dicom_microscopy_dataset(FIELD, patient_id=pid)
            del ds.StudyInstanceUID
            status, comment = _send(ds, rx.port)
            assert status == 0xC000 and "no Study Instance UID" in comment
    assert got.items == [] and _spooled(tmp_path) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_malformed_number_of_frames_gets_a_named_refusal(receiver, tmp_path: Path) -> None:
    rx, got = receiver
    path = write_with_malformed_integer(
        dicom_microscopy_dataset(FIELD), "NumberOfFrames", "abc", tmp_path / "nf.dcm"
    )
    status, comment = _send_file(path, rx.port)
    assert status == 0xC000 and "NumberOfFrames" in comment
    assert got.items == [] and _spooled(rx.spool_dir) == []


@pytest.mark.parametrize("scan_garbage", [True, False], ids=["zeroed-scan", "not-jpeg"])
def test_undecodable_frame_is_refused_at_receipt(receiver, scan_garbage: bool) -> None:
    rx, got = receiver
    ds = dicom_microscopy_dataset(FIELD, transfer_syntax=JPEGBaseline8Bit)
    status, comment = _send(damage_first_jpeg_frame(ds, keep_headers=scan_garbage), rx.port)
    assert status == 0xC000 and "frame 0 could not be decoded" in comment
    assert got.items == [] and _spooled(rx.spool_dir) == []


def test_study_mode_retries_a_study_the_queue_could_not_take(tmp_path: Path) -> None:
    calls: list[Path] = []
    done = threading.Event()

    def busy_once(path: Path, ref: DicomReference) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise QueueFullError("analysis queue is full")
        done.set()

    settings = DicomSettings(port=0, analysis_unit="study", study_idle_s=0.2)
    with CStoreReceiver(settings, tmp_path, busy_once) as rx:
        ds = dicom_microscopy_dataset(FIELD)
        assert _send(ds, rx.port)[0] == 0x0000
        assert done.wait(10), "an acknowledged study was dropped after a full queue"
    assert calls == [tmp_path / ds.StudyInstanceUID] * 2


def test_callback_failure_comment_keeps_the_reason(tmp_path: Path) -> None:
    from leuk_fhir.errors import InvalidImageError

    def analyse(path: Path, ref: DicomReference) -> None:
        raise InvalidImageError(f"{path.name}: frame 0 could not be decoded: broken")

    with CStoreReceiver(DicomSettings(port=0), tmp_path, analyse) as rx:
        status, comment = _send(dicom_microscopy_dataset(FIELD), rx.port)
    assert status == 0xC000 and comment.startswith("instance: frame 0 could not be decoded")


class Refusing(Received):
    """A callback whose analysis queue is full for the first ``full`` calls."""

    def __init__(self, full: int) -> None:
        super().__init__()
        self.full = full

    def __call__(self, path: Path, ref: DicomReference) -> None:
        if self.full > 0:
            self.full -= 1
            raise QueueFullError("analysis queue is full")
        super().__call__(path, ref)


def test_studies_left_in_the_spool_are_offered_again_at_start(tmp_path: Path) -> None:
    """A study acknowledged but never handed over (here: the queue was full when the listener
    stopped) is pending again when a listener with ``recover_spool`` starts on that spool."""
    settings = DicomSettings(port=0, analysis_unit="study", study_idle_s=0.3)
    first = dicom_microscopy_dataset(FIELD)
    second = dicom_microscopy_dataset(FIELD[:, ::-1], study_uid=first.StudyInstanceUID)
    with CStoreReceiver(settings, tmp_path, Refusing(full=100)) as rx:
        assert _send(first, rx.port)[0] == 0 and _send(second, rx.port)[0] == 0
    folder = tmp_path / first.StudyInstanceUID
    assert len(list(folder.glob("*.dcm"))) == 2
    # a crash in the middle of a write leaves a .part file (not provoked here: written by hand)
    (folder / ".incoming" / "dead.part").write_bytes(b"half an instance")

    untouched = Received()
    with CStoreReceiver(settings, tmp_path, untouched):  # the default: no recovery
        assert not untouched.event.wait(1.0)  # three idle periods
    assert untouched.items == [] and (folder / ".incoming" / "dead.part").exists()

    got = Refusing(full=1)  # still full at the first offer: offered again after the idle time
    with CStoreReceiver(settings, tmp_path, got, recover_spool=True):
        assert got.event.wait(10)
    [(path, ref)] = got.items
    assert path == folder and ref.study_uid == first.StudyInstanceUID
    assert ref.sop_instance_uid is None and ref.series_uid is None
    assert not (folder / ".incoming" / "dead.part").exists()
    assert open_acquisition(folder).pixels.frame_count == 2


def test_instances_left_in_the_spool_are_offered_one_by_one(tmp_path: Path) -> None:
    settings = DicomSettings(port=0)
    datasets = [dicom_microscopy_dataset(FIELD), dicom_microscopy_dataset(FIELD[::-1])]
    with CStoreReceiver(settings, tmp_path, Refusing(full=100)) as rx:
        assert [_send(ds, rx.port)[0] for ds in datasets] == [0xA700, 0xA700]
    (tmp_path / "not-a-dicom-study").mkdir()
    (tmp_path / "not-a-dicom-study" / "x.dcm").write_bytes(b"junk")  # left alone, logged
    got = Refusing(full=1)
    with CStoreReceiver(settings, tmp_path, got, recover_spool=True):
        deadline = threading.Event()
        for _ in range(100):
            if len(got.items) == 2:
                break
            deadline.wait(0.1)
    assert sorted(ref.sop_instance_uid for _, ref in got.items) == sorted(
        ds.SOPInstanceUID for ds in datasets
    )
    assert all(path.is_file() and path.suffix == ".dcm" for path, _ in got.items)
    assert (tmp_path / "not-a-dicom-study" / "x.dcm").exists()


def test_a_full_disk_answers_out_of_resources_and_keeps_nothing_partial(small_disk) -> None:
    """The spool on a full file system (a real tmpfs): C-STORE is answered 0xA700 "out of
    resources", which modalities retry, and no half-written file is left; once space is free
    the same instance is stored."""
    got = Received()
    ds = dicom_microscopy_dataset(FIELD)
    spool = small_disk.path / "spool"
    with CStoreReceiver(DicomSettings(port=0), spool, got) as rx:
        small_disk.fill(leave=16 * 1024)
        status, comment = _send(ds, rx.port)
        assert status == 0xA700, (status, comment)
        assert "no space left" in (comment or "")
        assert not [p for p in spool.rglob("*") if p.is_file()]
        small_disk.free()
        assert _send(ds, rx.port)[0] == 0
        assert got.event.wait(10) and got.items[0][1].sop_instance_uid == ds.SOPInstanceUID
