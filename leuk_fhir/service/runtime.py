"""The running service: store, queue, workers, pipeline, outbox, DICOM listener, events.

One :class:`LeukFhirService` per app (``app.extensions["leuk_fhir"]``). Uploads and job rows are
persisted under ``data_dir`` before a submission is acknowledged; workers run the
:class:`~leuk_fhir.pipeline.AnalysisPipeline` and record results; events go to the page.
Logs name analyses by id only: no file names, no patient data.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from leuk_fhir.acquisition import Acquisition, DicomReference, Scope, Transport
from leuk_fhir.adapters.spool import INCOMING
from leuk_fhir.errors import (
    InputError,
    InvalidImageError,
    LeukFhirError,
    NotFoundError,
    StorageFullError,
    is_storage_full,
    storage_full_error,
)
from leuk_fhir.findings import CellFinding, Findings, Outcome
from leuk_fhir.model.images import MIN_SIDE
from leuk_fhir.pipeline import AnalysisOrder, AnalysisPipeline
from leuk_fhir.service.auth import RateLimiter
from leuk_fhir.service.events import ALERT_EVENT, ANALYSIS_EVENT, EventBroker
from leuk_fhir.service.store import AnalysisRecord, ServiceStore, new_analysis_id
from leuk_fhir.service.worker import AnalysisQueue
from leuk_fhir.settings import Settings

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 2048
#: Under data_dir: STOW-RS instances between their request and its answer.
STOW_SPOOL = "stow-spool"
#: Under data_dir: analysis folders found without a database row at start.
UNCOMMITTED = "uncommitted"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_filename(name: str | None, default: str = "upload") -> str:
    base = os.path.basename(name or "") or default
    base = _SAFE_NAME.sub("_", base).strip("._") or default
    return base[:120]


def _digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files in name order (a DICOM study)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _link_or_move(source: Path, target: Path) -> None:
    """Hard-link ``source`` (a file, or a folder's files, not its ``.incoming`` writes in
    progress) at ``target``; move it where the file system cannot link."""
    try:
        if source.is_dir():
            shutil.copytree(source, target, copy_function=os.link,
                            ignore=shutil.ignore_patterns(INCOMING))
        else:
            os.link(source, target)
    except OSError:
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        shutil.move(str(source), target)


def _remove_linked(source: Path, upload: Path) -> None:
    """Once the analysis holds ``upload``, remove from ``source`` the files linked into it,
    and then ``source`` itself if nothing else arrived there meanwhile (a late instance of a
    DICOM study stays, and is a study of its own)."""
    if not source.is_dir():
        source.unlink(missing_ok=True)
        return
    for file in (p for p in upload.rglob("*") if p.is_file()):
        (source / file.relative_to(upload)).unlink(missing_ok=True)
    for folder in sorted((p for p in source.rglob("*") if p.is_dir()), reverse=True) + [source]:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def findings_summary(findings: Findings) -> dict[str, Any]:
    """Findings as the JSON the API and the page show (per-cell evidence included)."""
    model = findings.model
    cells = []
    for cell in findings.cells:
        cls = model.cell_class(cell.label)
        cells.append({
            "label": cell.label,
            "display": cls.display if cls else cell.label,
            "is_blast": bool(cls and cls.is_blast),
            "confidence": round(cell.confidence, 4),
            "probabilities": {k: round(float(v), 4) for k, v in cell.probabilities.items()},
            "box": list(cell.box) if cell.box else None,
            "frame": cell.frame,
            "indeterminate_reason": cell.indeterminate_reason,
        })
    return {
        "outcome": str(findings.outcome),
        "blast_percentage": findings.blast_percentage,
        "blast_count": findings.blast_count,
        "classified_count": findings.classified_count,
        "counts": findings.counts,
        "confidence": round(findings.confidence, 4),
        "scope": str(findings.acquisition.scope),
        "model": {
            "name": model.name,
            "version": model.version,
            "sha256": model.sha256,
            "is_demo": model.is_demo,
            "classes": [
                {"name": c.name, "display": c.display, "is_blast": c.is_blast}
                for c in model.classes
            ],
        },
        "cells": cells,
    }


def write_preview(acquisition: Acquisition, target: Path, max_pixels: int) -> dict[str, Any] | None:
    """Save a browser-viewable PNG of frame 0 (downsampled) and return its geometry.

    ``scale`` maps level-0 pixel coordinates (the cells' boxes) onto the preview.
    """
    from PIL import Image

    pixels = acquisition.pixels
    levels = pixels.levels
    width0, height0 = levels[0].width, levels[0].height
    index = next(
        (i for i, lv in enumerate(levels) if max(lv.width, lv.height) <= PREVIEW_MAX_SIDE),
        len(levels) - 1,
    )
    level = levels[index]
    if index == 0 and width0 * height0 > max_pixels:
        return None
    array = (
        pixels.read_frame(0)
        if index == 0
        else pixels.read_region(0, 0, level.width, level.height, level=index)
    )
    image = Image.fromarray(array)
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, format="PNG")
    return {
        "width": image.width,
        "height": image.height,
        "level0_width": width0,
        "level0_height": height0,
        "scale": image.width / width0,
        "frame_count": pixels.frame_count,
    }


class LeukFhirService:
    """Everything the API needs, with an explicit :meth:`start` / :meth:`stop`."""

    def __init__(self, settings: Settings, *, outbox: Any | None = None) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ServiceStore(self.data_dir / "service.sqlite3")
        self.broker = EventBroker()
        self.rate_limiter = RateLimiter(settings.service.rate_limit_per_minute)
        if outbox is None:
            from leuk_fhir.delivery import Outbox

            outbox = Outbox(self.data_dir / "outbox.sqlite3", lease_s=settings.outbox.lease_s)
        self.outbox = outbox
        self.pipeline = AnalysisPipeline(settings, outbox=outbox)
        self.queue = AnalysisQueue(
            self.process,
            workers=settings.service.workers,
            capacity=settings.service.queue_size,
        )
        self.sender: Any | None = None
        self.dicom_receiver: Any | None = None
        self.model_error: str | None = None
        self._model_ready = threading.Event()
        self._started = False
        self.metrics: Any | None = None  # set by metrics.init_app

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, *, dicom: bool | None = None, sender: bool | None = None) -> None:
        """Load the model, re-queue unfinished work, start workers, sender and listener."""
        if self._started:
            return
        self._started = True
        self._set_aside_uncommitted()
        threading.Thread(target=self._load_model, name="leuk-fhir-model", daemon=True).start()
        self.queue.start(self.store.unfinished_analysis_ids())
        if sender if sender is not None else bool(self.settings.fhir.base_url):
            from leuk_fhir.delivery import EhrClient, OutboxSender

            client = EhrClient.from_settings(self.settings.fhir)
            self.sender = OutboxSender(self.outbox, client, self.settings.outbox)
            self.sender.start()
        if dicom if dicom is not None else self.settings.dicom.enabled:
            from leuk_fhir.adapters.dicom_scp import CStoreReceiver

            self.dicom_receiver = CStoreReceiver(
                self.settings.dicom, self.data_dir / "dicom-spool", self.submit_dicom_instance,
                image_settings=self.settings.image, recover_spool=True,
            )
            self.dicom_receiver.start()

    def stop(self) -> None:
        """Stop listener, workers and sender; unfinished analyses stay queued on disk."""
        if self.dicom_receiver is not None:
            self.dicom_receiver.stop()
            self.dicom_receiver = None
        self.queue.stop()
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        self.broker.close()
        self._started = False

    def _load_model(self) -> None:
        try:
            info = self.pipeline.model_info
            log.info("model %s %s loaded%s", info.name, info.version, " (DEMO)" if info.is_demo else "")
        except Exception as exc:  # readyz reports it; analyses fail with the same message
            self.model_error = f"{type(exc).__name__}: {exc}"
            log.error("cannot load the model: %s", self.model_error)
        finally:
            self._model_ready.set()

    @property
    def model_loaded(self) -> bool:
        return self._model_ready.is_set() and self.model_error is None

    def readiness(self) -> dict[str, Any]:
        """What /readyz reports: each check and whether all pass."""
        checks: dict[str, Any] = {}
        try:
            self.store.ping()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        checks["workers"] = "ok" if self.queue.alive else "not running"
        if not self._model_ready.is_set():
            checks["model"] = "loading"
        else:
            checks["model"] = "ok" if self.model_error is None else f"error: {self.model_error}"
        if self.dicom_receiver is not None:
            checks["dicom_listener"] = "ok"
        if self.sender is not None:
            checks["outbox_sender"] = "ok"
        return {"ready": all(v == "ok" for v in checks.values()), "checks": checks}

    def _set_aside_uncommitted(self) -> None:
        """At start, put aside the intake a stopped process never committed. Analysis folders
        without a row (an HTTP or STOW-RS upload its client got no answer for and sends again,
        or links to DICOM files the listener offers again) move to ``data_dir/uncommitted``,
        never deleted: a database restored from an older backup would not know newer
        analyses either. The STOW-RS spool is emptied: a request empties it before it is
        answered, so what is left belongs to requests never answered."""
        root = self.data_dir / "analyses"
        known = self.store.analysis_ids() if root.is_dir() else set()
        for folder in sorted(root.iterdir()) if root.is_dir() else ():
            if folder.is_dir() and folder.name not in known:
                aside = self.data_dir / UNCOMMITTED / folder.name
                aside.parent.mkdir(exist_ok=True)
                shutil.move(str(folder), aside)
                log.warning("analysis folder %s has no row in the database (a stop during "
                            "intake, or an older database): moved to %s", folder.name, aside)
        stow_spool = self.data_dir / STOW_SPOOL
        if stow_spool.is_dir() and any(stow_spool.iterdir()):
            log.warning("STOW-RS instances of requests never answered (a stop during intake): "
                        "removed from %s", stow_spool)
            shutil.rmtree(stow_spool, ignore_errors=True)

    # ---- intake ----------------------------------------------------------------------------
    def analysis_dir(self, analysis_id: str) -> Path:
        return self.data_dir / "analyses" / analysis_id

    def submit_stream(
        self,
        stream: IO[bytes],
        *,
        filename: str | None,
        media_type: str | None,
        transport: Transport,
        scope: Scope | None = None,
        order: AnalysisOrder | None = None,
        submitted_by: str | None = None,
    ) -> AnalysisRecord:
        """Persist an upload and its job row, validate it, queue it. Raises before persisting
        when the queue is full, and removes everything again when the input is invalid."""
        return self._accept(
            lambda upload: self._save_stream(stream, upload),
            filename=filename, media_type=media_type, transport=transport, scope=scope,
            order=order, submitted_by=submitted_by,
        )

    def submit_dicom_instance(self, path: Path, reference: DicomReference) -> None:
        """C-STORE callback: take over a spooled instance (or study folder) and queue it.

        Raises :class:`~leuk_fhir.errors.QueueFullError` when the queue is full, which the
        receiver answers with a DICOM "out of resources" status. The instance was validated
        and stored before this is called (a study folder, in study mode, was acknowledged
        instance by instance; an instance left in the spool by an earlier run was too), so
        input that cannot then be opened is kept as a failed analysis that says why, on the
        page and in the API, rather than refused and removed: C-STORE's status is about
        storage, and analysis failures are reported where every other one is.
        """
        self.submit_file(
            path, transport=Transport.C_STORE, media_type="application/dicom",
            filename=f"{reference.sop_instance_uid or reference.study_uid}"
            + ("" if path.is_dir() else ".dcm"),
            submitted_by=f"DICOM AE {reference.calling_ae_title or '?'}",
            keep_rejected=True,
        )

    def submit_file(
        self,
        path: Path,
        *,
        transport: Transport,
        media_type: str | None,
        filename: str | None,
        scope: Scope | None = None,
        submitted_by: str | None = None,
        keep_rejected: bool = False,
    ) -> AnalysisRecord:
        """Queue a file (or DICOM study folder) already on disk. With ``keep_rejected``, input
        that cannot be opened is kept as a failed analysis instead of raising and being removed
        (for data whose sender was already told it arrived).

        ``path`` is hard-linked into the analysis folder and removed only once the analysis is
        committed, so a crash in between leaves it where it was (the DICOM listener offers it
        again at start) and the half-made analysis folder is cleared at start
        (:meth:`_set_aside_uncommitted`). Where links cannot be made it is moved, as before.
        """

        def link_in(upload: Path) -> str:
            _link_or_move(path, upload)
            return _digest(upload)

        record = self._accept(
            link_in, filename=filename, media_type=media_type, transport=transport,
            scope=scope, order=None, submitted_by=submitted_by, keep_rejected=keep_rejected,
        )
        _remove_linked(path, Path(record.upload_path))
        return record

    def _accept(
        self,
        place: Callable[[Path], str],
        *,
        filename: str | None,
        media_type: str | None,
        transport: Transport,
        scope: Scope | None,
        order: AnalysisOrder | None,
        submitted_by: str | None,
        keep_rejected: bool = False,
    ) -> AnalysisRecord:
        """Reserve a queue slot, ``place`` the upload (returns its sha256), persist, queue.

        Anything that fails before the job row is committed releases the slot and removes
        the analysis folder, so nothing half-written is ever analysed; with ``keep_rejected``
        an upload that was placed whole but cannot be opened is kept as a failed analysis.
        """
        self.queue.reserve()
        analysis_id = new_analysis_id()
        folder = self.analysis_dir(analysis_id)
        committed = False
        digest: str | None = None
        try:
            upload = folder / "upload" / _safe_filename(filename)
            upload.parent.mkdir(parents=True, exist_ok=True)
            digest = place(upload)
            record = self._persist_and_queue(
                analysis_id, upload, filename=filename, media_type=media_type, digest=digest,
                transport=transport, scope=scope, order=order, submitted_by=submitted_by,
            )
            committed = True
            return record
        except InputError as exc:
            if not keep_rejected or digest is None:
                raise
            self.queue.release()
            committed = True  # the slot is released; the folder stays with the failed analysis
            self.store.insert_analysis(
                analysis_id, transport=str(transport), upload_path=upload, filename=filename,
                media_type=media_type, content_sha256=digest,
                scope=str(scope) if scope else None, submitted_by=submitted_by,
            )
            log.warning("analysis %s: kept, not analysed: %s", analysis_id, exc)
            self._fail(analysis_id, exc.code, str(exc))
            return self.store.get_analysis(analysis_id)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_storage_full(exc):
                raise
            log.error("intake refused, the disk of %s is full: %s", self.data_dir, exc)
            raise storage_full_error(exc, "the service's data directory") from exc
        finally:
            if not committed:
                self.queue.release()
                shutil.rmtree(folder, ignore_errors=True)

    def _save_stream(self, stream: IO[bytes], target: Path) -> str:
        limit = self.settings.image.max_bytes
        digest = hashlib.sha256()
        size = 0
        with open(target, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    from leuk_fhir.errors import ImageTooLargeError

                    raise ImageTooLargeError(
                        f"the upload exceeds {limit} bytes",
                        hint="raise LEUK_FHIR_IMAGE_MAX_BYTES or send a smaller image",
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size == 0:
            raise InputError("the upload is empty")
        return digest.hexdigest()

    def _persist_and_queue(
        self,
        analysis_id: str,
        upload: Path,
        *,
        filename: str | None,
        media_type: str | None,
        digest: str,
        transport: Transport,
        scope: Scope | None,
        order: AnalysisOrder | None,
        submitted_by: str | None,
    ) -> AnalysisRecord:
        # Fail fast on bad input: open it (headers only; pixels stay lazy) before accepting.
        acquisition = self.pipeline.ingest(upload, transport=transport, scope=scope, order=order)
        acquisition.pixels.close()
        levels = acquisition.pixels.levels
        if levels and min(levels[0].width, levels[0].height) < MIN_SIDE:
            raise InvalidImageError(
                f"{levels[0].width}x{levels[0].height} pixels is too small "
                f"(minimum {MIN_SIDE} px a side)"
            )
        record = self.store.insert_analysis(
            analysis_id,
            transport=str(transport),
            upload_path=upload,
            filename=filename,
            media_type=media_type or acquisition.media_type,
            content_sha256=digest,
            scope=str(scope or acquisition.scope),
            submitted_by=submitted_by,
            order=order.to_json() if order else None,
        )
        self.queue.commit(analysis_id)
        log.info("analysis %s queued (%s)", analysis_id, transport)
        self.broker.publish(ANALYSIS_EVENT, {"id": analysis_id, "status": record.status})
        return record

    # ---- work ------------------------------------------------------------------------------
    def process(self, analysis_id: str) -> None:
        """Run the pipeline for one queued analysis and record the outcome (worker thread)."""
        try:
            record = self.store.get_analysis(analysis_id)
        except NotFoundError:
            return
        self.store.mark_running(analysis_id)
        self.broker.publish(ANALYSIS_EVENT, {"id": analysis_id, "status": "running"})
        folder = self.analysis_dir(analysis_id)
        preview: dict[str, Any] = {}
        started = time.perf_counter()

        def keep_preview(acquisition: Acquisition) -> None:
            try:
                geometry = write_preview(
                    acquisition, folder / "preview.png", self.settings.image.max_pixels
                )
                if geometry:
                    preview.update(geometry)
            except Exception as exc:  # a missing preview must not fail the analysis
                log.warning("analysis %s: no preview (%s)", analysis_id, type(exc).__name__)

        try:
            result = self.pipeline.run(
                record.upload_path,
                transport=Transport(record.transport),
                scope=Scope(record.scope) if record.scope else None,
                order=AnalysisOrder.from_json(record.order),
                on_ingested=keep_preview,
            )
        except LeukFhirError as exc:
            self._fail(analysis_id, exc.code, str(exc))
            return
        except Exception as exc:
            if is_storage_full(exc):
                self._fail_storage_full(analysis_id, exc)
                return
            log.exception("analysis %s failed unexpectedly", analysis_id)
            self._fail(analysis_id, "internal", f"internal error ({type(exc).__name__})")
            return
        report = result.report
        try:  # a full disk here must end in "failed", not an analysis left "running"
            (folder / "bundle.json").write_text(json.dumps(report.bundle), encoding="utf-8")
            (folder / "report.html").write_text(report.html, encoding="utf-8")
            if report.pdf:
                (folder / "report.pdf").write_bytes(report.pdf)
            summary = findings_summary(result.findings)
            summary["image"] = preview or None
            self.store.mark_completed(
                analysis_id,
                result=summary,
                outcome=summary["outcome"],
                blast_percentage=result.findings.blast_percentage,
                report_identifier=report.report_identifier,
                delivery_keys=list(result.delivery_keys),
            )
        except Exception as exc:
            if is_storage_full(exc):
                self._fail_storage_full(analysis_id, exc)
                return
            log.exception("analysis %s: its results could not be kept", analysis_id)
            self._fail(analysis_id, "internal", f"results not kept ({type(exc).__name__})")
            return
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.analysis_finished(summary["outcome"], elapsed)
        log.info("analysis %s completed: %s in %.2fs", analysis_id, summary["outcome"], elapsed)
        self.broker.publish(ANALYSIS_EVENT, {
            "id": analysis_id, "status": "completed", "outcome": summary["outcome"],
        })
        if result.findings.outcome == Outcome.BLASTS_DETECTED:
            self.broker.publish(ALERT_EVENT, {
                "id": analysis_id,
                "outcome": summary["outcome"],
                "blast_percentage": result.findings.blast_percentage,
                "ordering_practitioner": record.order.get("ordering_practitioner"),
                "communication_queued": result.alert_key is not None,
            })

    def _fail_storage_full(self, analysis_id: str, exc: BaseException) -> None:
        log.error("analysis %s: the disk of %s is full: %s", analysis_id, self.data_dir, exc)
        self._fail(
            analysis_id, StorageFullError.code,
            "no space left on the disk of the service's data directory: the results were not "
            "kept (the upload is); free space, then submit the image again",
        )

    def _fail(self, analysis_id: str, code: str, message: str) -> None:
        self.store.mark_failed(analysis_id, code=code, message=message)
        if self.metrics is not None:
            self.metrics.analysis_finished("failed", None)
        log.info("analysis %s failed: %s", analysis_id, code)
        self.broker.publish(ANALYSIS_EVENT, {"id": analysis_id, "status": "failed", "error": code})

    # ---- sign-off --------------------------------------------------------------------------
    def _stored_findings(self, record: AnalysisRecord) -> tuple[Acquisition | None, Findings | None]:
        """Findings rebuilt from the stored result, to re-render the report as signed off.

        None when the model changed since the analysis or the upload cannot be opened; the
        sign-off then proceeds without new renderings.
        """
        result = record.result or {}
        try:
            model = self.pipeline.model_info
            if model.sha256 != result.get("model", {}).get("sha256"):
                return None, None
            acquisition = self.pipeline.ingest(
                record.upload_path, transport=Transport(record.transport),
                scope=Scope(record.scope) if record.scope else None,
                order=AnalysisOrder.from_json(record.order),
            )
        except LeukFhirError as exc:
            log.warning("analysis %s: report not re-rendered at sign-off (%s)", record.id, exc.code)
            return None, None
        cells = tuple(
            CellFinding(
                label=c["label"], probabilities=c["probabilities"],
                box=tuple(c["box"]) if c["box"] else None,  # type: ignore[arg-type]
                frame=c["frame"], indeterminate_reason=c["indeterminate_reason"],
            )
            for c in result.get("cells", [])
        )
        return acquisition, Findings(acquisition=acquisition, model=model, cells=cells)

    @staticmethod
    def _keep_final_report(folder: Path, preliminary: dict[str, Any], signed: dict[str, Any]) -> None:
        """Keep the signed-off Bundle and its renderings next to the preliminary ones."""
        (folder / "bundle-preliminary.json").write_text(json.dumps(preliminary), encoding="utf-8")
        (folder / "bundle.json").write_text(json.dumps(signed), encoding="utf-8")
        report: dict[str, Any] = next((e["resource"] for e in signed.get("entry", [])
                       if e["resource"].get("resourceType") == "DiagnosticReport"), {})
        for form in report.get("presentedForm", []):
            data = base64.b64decode(form.get("data", ""))
            if form.get("contentType") == "text/html" and data:
                (folder / "report.html").write_bytes(data)
            elif form.get("contentType") == "application/pdf" and data:
                (folder / "report.pdf").write_bytes(data)

    def sign_off(
        self,
        analysis_id: str,
        *,
        signed_off_by: str,
        practitioner_identifier: str,
        role: str,
        comment: str | None,
    ) -> AnalysisRecord:
        """preliminary -> final: record the person and send the final report to the EHR."""
        # Claimed first, so of two concurrent sign-offs only one builds, queues and writes.
        record = self.store.claim_sign_off(analysis_id)
        folder = self.analysis_dir(analysis_id)
        try:
            report_bundle = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
            acquisition, findings = self._stored_findings(record)
            try:
                key, signed = self.pipeline.sign_off(
                    report_bundle,
                    report_identifier=record.report_identifier or analysis_id,
                    practitioner_identifier=practitioner_identifier,
                    practitioner_name=signed_off_by,
                    comment=comment,
                    findings=findings,
                )
            finally:
                if acquisition is not None:
                    acquisition.pixels.close()
            self._keep_final_report(folder, report_bundle, signed)
            record = self.store.record_sign_off(
                analysis_id, signed_off_by=signed_off_by, role=role, comment=comment,
                delivery_key=key,
            )
        except BaseException:
            self.store.release_sign_off(analysis_id)
            raise
        log.info("analysis %s signed off (role %s)", analysis_id, role)
        self.broker.publish(ANALYSIS_EVENT, {
            "id": analysis_id, "status": record.status, "report_status": "final",
        })
        return record
