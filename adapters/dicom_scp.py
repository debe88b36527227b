"""A DICOM Storage SCP (C-STORE) with Verification (C-ECHO), built on pynetdicom.

Microscopes, slide scanners and PACS push instances to our AE title. Each instance is
validated (SOP class, transfer syntax, pixel data, size), spooled durably (temp file, fsync,
rename) and only then acknowledged with status 0x0000; then ``on_instance`` is called. In
``analysis_unit = "study"`` mode, ``on_instance(study_dir, study_reference)`` is called once a
study has received nothing for ``study_idle_s`` seconds.

With ``recover_spool`` (for a callback that takes each file or study folder out of the spool,
as the service does), nothing acknowledged is forgotten: at start, instances an earlier run
left in the spool (it was killed before their study went idle, or stopped while the analysis
queue was full) are offered to ``on_instance`` again, as pending studies in study mode and one
by one in instance mode; half-written ``.part`` files, never acknowledged, are removed.

Refusals: an unknown calling AE title is rejected at association (A-ASSOCIATE-RJ, "calling AE
title not recognised"); SOP classes and transfer syntaxes we cannot read are rejected at
presentation-context negotiation; a bad instance (no Study Instance UID, a SOP Instance UID
other than the command's, undecodable first frame, too large, other content already received
under its SOP Instance UID, ...) gets the error's ``dicom_status`` with an Error Comment naming
the problem, and nothing is spooled.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from leuk_fhir.acquisition import DicomReference
from leuk_fhir.adapters.dicom_files import check_first_frame, inflate_dataset, validate_dicom
from leuk_fhir.adapters.dicom_metadata import ACCEPTED_SOP_CLASSES, dicom_reference
from leuk_fhir.adapters.plugins import TRANSFER_SYNTAX_PACKAGES, decoder_available
from leuk_fhir.adapters.spool import INCOMING, durable_write, safe_uid, spool_path
from leuk_fhir.errors import (
    ConfigurationError,
    ImageTooLargeError,
    InvalidImageError,
    LeukFhirError,
    QueueFullError,
)
from leuk_fhir.settings import DicomSettings, ImageSettings

DEFAULT_IMAGE_SETTINGS = ImageSettings()
log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110

InstanceCallback = Callable[[Path, DicomReference], None]


def accepted_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes we accept: those with a decoder installed on this machine."""
    return [ts for ts in TRANSFER_SYNTAX_PACKAGES if decoder_available(ts)]


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO: at most 64 characters, so the essence comes first
    return ds


class CStoreReceiver:
    """Receive DICOM instances over C-STORE into ``spool_dir`` and hand each to ``on_instance``.

    ``rx.start()`` binds ``dicom_settings.host:port`` (port 0 picks a free one, see
    :attr:`port`) and returns at once; ``rx.stop()`` closes the server and flushes pending
    studies.
    """

    def __init__(
        self,
        dicom_settings: DicomSettings,
        spool_dir: Path,
        on_instance: InstanceCallback,
        *,
        image_settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
        recover_spool: bool = False,
    ) -> None:
        if dicom_settings.analysis_unit not in ("instance", "study"):
            raise ConfigurationError(
                f"dicom.analysis_unit must be 'instance' or 'study', got {dicom_settings.analysis_unit!r}"
            )
        if not 0 < len(dicom_settings.ae_title.strip()) <= 16:
            raise ConfigurationError(
                f"dicom.ae_title must be 1-16 characters: {dicom_settings.ae_title!r}"
            )
        self.settings = dicom_settings
        self.image_settings = image_settings
        self.spool_dir = Path(spool_dir)
        self.on_instance = on_instance
        self.recover_spool = recover_spool
        self._server: Any = None
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[float, DicomReference]] = {}
        #: Instances found in the spool at start (instance mode), offered again one by one.
        self._leftovers: list[tuple[Path, DicomReference]] = []
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        #: Counters for monitoring: stored, refused, callback_errors.
        self.stats = {"stored": 0, "refused": 0, "callback_errors": 0}

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the C-STORE receiver is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        from pynetdicom import AE, evt

        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if self.recover_spool:
            self._recover_spool()
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = 0  # unlimited
        if self.settings.allowed_calling_aes:
            ae.require_calling_aet = [a.strip() for a in self.settings.allowed_calling_aes]
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_REJECTED, self._log_rejected),
        ]
        self._ae = ae
        try:
            self._server = ae.start_server(
                (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen for DICOM on {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        if self.settings.analysis_unit == "study" or self._leftovers:
            self._stop.clear()
            self._flusher = threading.Thread(
                target=self._flush_loop, name="dicom-study-flush", daemon=True
            )
            self._flusher.start()
        log.info(
            "C-STORE SCP %s listening on %s:%d",
            self.settings.ae_title,
            self.settings.host,
            self.port,
        )

    def stop(self) -> None:
        """Stop listening. Associations still open are aborted first: the server's close
        waits for their threads, so a peer that never releases (a hung scanner) would
        otherwise hold shutdown for the whole network timeout. Files already received are
        in the spool; an aborted sender retries."""
        if self._server is not None:
            for assoc in list(self._server.active_associations):
                assoc.abort()
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
            self._flusher = None
        self._flush_studies(force=True)

    def __enter__(self) -> CStoreReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers ---------------------------------------------------------------------------

    def _log_rejected(self, event: Any) -> None:
        log.warning(
            "association from %s refused (calling AE title %r not in the allow-list)",
            event.assoc.requestor.address,
            event.assoc.requestor.ae_title,
        )

    def _dataset(self, event: Any) -> Dataset:
        """The received data set, size-checked before it is decoded (a Deflated one inflated
        within ``max_bytes``)."""
        raw = event.request.DataSet.getvalue()
        limit = self.image_settings.max_bytes
        if len(raw) > limit:
            raise ImageTooLargeError(f"instance is {len(raw):,} bytes, above {limit:,}")
        if event.context.transfer_syntax.is_deflated:
            body = inflate_dataset(raw, limit, "instance")
            ds = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
        else:
            ds = event.dataset
        ds.file_meta = event.file_meta
        return ds

    @staticmethod
    def _reference(ds: Dataset, command_uid: str, calling: str) -> DicomReference:
        """The instance's reference, its SOP Instance UID the command's; refuses an instance
        without Study Instance UID or whose data set names another SOP Instance UID."""
        ref = dicom_reference(ds, calling)
        if not command_uid:
            raise InvalidImageError("no Affected SOP Instance UID in the C-STORE request")
        if ref.sop_instance_uid and ref.sop_instance_uid != command_uid:
            raise InvalidImageError(
                "SOP Instance UID (0008,0018) differs from the C-STORE request's"
            )
        if not ref.study_uid:
            raise InvalidImageError(
                "no Study Instance UID (0020,000D): not pooled with other instances"
            )
        return dataclasses.replace(ref, sop_instance_uid=command_uid)

    def _handle_store(self, event: Any) -> Dataset | int:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        try:
            ds = self._dataset(event)
            ref = self._reference(ds, sop_uid, calling)
            validate_dicom(ds, self.image_settings, name="instance")
            check_first_frame(ds, "instance")
            path = durable_write(
                spool_path(self.spool_dir, ref.study_uid, ref.sop_instance_uid),
                event.encoded_dataset(),
                refuse_different=True,
            )
        except LeukFhirError as exc:
            self.stats["refused"] += 1
            log.warning("C-STORE of %s from %s refused: %s", sop_uid or "?", calling, exc)
            return _status(exc.dicom_status, str(exc))
        except Exception as exc:  # a corrupt data set must not kill the association thread
            self.stats["refused"] += 1
            log.warning("C-STORE from %s could not be read: %s", calling, exc)
            return _status(0xC000, f"cannot read data set: {exc}")
        self.stats["stored"] += 1
        if self.settings.analysis_unit == "study":
            with self._lock:
                self._pending[ref.study_uid] = (time.monotonic(), ref)
            return _status(STATUS_SUCCESS)
        try:
            self.on_instance(path, ref)
        except LeukFhirError as exc:
            self.stats["callback_errors"] += 1
            log.warning(
                "instance %s stored at %s but not queued: %s", ref.sop_instance_uid, path, exc
            )
            # The comment keeps the reason: the file name (the long UID) becomes "instance".
            return _status(exc.dicom_status, str(exc).replace(path.name, "instance"))
        except Exception as exc:
            self.stats["callback_errors"] += 1
            log.exception("instance %s stored at %s but not queued", ref.sop_instance_uid, path)
            return _status(STATUS_PROCESSING_FAILURE, f"stored, not queued: {exc}")
        return _status(STATUS_SUCCESS)

    # -- what an earlier run left ----------------------------------------------------------------

    def _recover_spool(self) -> None:
        """Queue again the instances an earlier run acknowledged but did not hand over."""
        found = 0
        for folder in sorted(p for p in self.spool_dir.iterdir() if p.is_dir()):
            for part in (folder / INCOMING).glob("*.part"):
                part.unlink(missing_ok=True)  # half-written: its sender was never answered
            for path in sorted(folder.glob("*.dcm")):
                try:
                    ref = dicom_reference(dcmread(path, stop_before_pixels=True))
                except Exception as exc:  # kept where it is for a person to look at
                    log.error("spooled file %s cannot be read again, left in place: %s", path, exc)
                    continue
                if not ref.sop_instance_uid:  # filed under the C-STORE command's UID
                    ref = dataclasses.replace(ref, sop_instance_uid=path.stem)
                if not ref.study_uid or safe_uid(ref.study_uid) != folder.name:
                    log.error("spooled file %s does not belong to study folder %s, left in place",
                              path, folder.name)
                    continue
                found += 1
                if self.settings.analysis_unit == "study":
                    self._pending.setdefault(ref.study_uid, (time.monotonic(), ref))
                else:
                    self._leftovers.append((path, ref))
        if found:
            log.warning(
                "%d instance(s) from an earlier run found in %s: offered for analysis again",
                found, self.spool_dir,
            )

    def _offer_leftovers(self) -> None:
        while self._leftovers:
            path, ref = self._leftovers[0]
            try:
                if path.exists():
                    self.on_instance(path, ref)
            except QueueFullError:
                return  # offered again on the next tick
            except Exception as exc:
                self.stats["callback_errors"] += 1
                log.error("spooled instance %s not queued, left in place: %s", path, exc)
            self._leftovers.pop(0)

    # -- study mode ----------------------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stop.wait(min(0.2, self.settings.study_idle_s / 4)):
            self._offer_leftovers()
            self._flush_studies(force=False)

    def _flush_studies(self, *, force: bool) -> None:
        now = time.monotonic()
        with self._lock:
            ready = [
                (uid, ref)
                for uid, (seen, ref) in self._pending.items()
                if force or now - seen >= self.settings.study_idle_s
            ]
            for uid, _ in ready:
                del self._pending[uid]
        for uid, ref in ready:
            study_ref = dataclasses.replace(ref, sop_instance_uid=None, series_uid=None)
            folder = self.spool_dir / safe_uid(uid)
            if not any(folder.glob("*.dcm")):
                continue  # taken whole by an earlier call (an instance that came during it)
            try:
                self.on_instance(folder, study_ref)
            except QueueFullError as exc:  # retried after the next idle period, not dropped
                if force:
                    log.error("study %s stays spooled in %s, not queued: %s", uid, folder, exc)
                    continue
                log.warning("study %s not queued yet, will retry: %s", uid, exc)
                with self._lock:
                    self._pending.setdefault(uid, (time.monotonic(), ref))
            except LeukFhirError as exc:
                self.stats["callback_errors"] += 1
                log.error("study %s (%s) acknowledged but not analysed: %s", uid, folder, exc)
            except Exception:
                self.stats["callback_errors"] += 1
                log.exception("study %s (%s) acknowledged but not analysed", uid, folder)
