"""The one place where the stages compose: ingest -> analyze -> report -> deliver.

Each stage is a method with a small typed input and output, testable alone; the classifier is
loaded once per :class:`AnalysisPipeline`. The service's workers, the DICOM listener and the
STOW-RS endpoint all go through :meth:`AnalysisPipeline.run`.

=========  ===========================================  ==========================================
stage      input                                        output
=========  ===========================================  ==========================================
ingest     a file on disk + how it arrived              :class:`~leuk_fhir.acquisition.Acquisition`
analyze    Acquisition                                  :class:`~leuk_fhir.findings.Findings`
report     Findings                                     ``ReportBundle`` (FHIR Bundle, HTML, PDF)
deliver    ReportBundle (+ Communication on blasts)     outbox keys (sent to the EHR by the sender)
=========  ===========================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from leuk_fhir.acquisition import Acquisition, PatientInfo, Scope, Transport
from leuk_fhir.adapters import open_acquisition
from leuk_fhir.analysis import analyze
from leuk_fhir.delivery import Outbox
from leuk_fhir.fhir import (
    ReportBundle,
    build_communication_bundle,
    build_report_bundle,
    build_signoff_bundle,
)
from leuk_fhir.findings import Findings, ModelInfo, Outcome
from leuk_fhir.model import CellClassifier, load_classifier
from leuk_fhir.settings import Settings

log = logging.getLogger(__name__)

#: Outbox ``kind`` of each Bundle the pipeline enqueues.
REPORT_KIND = "report"
ALERT_KIND = "communication"
SIGNOFF_KIND = "sign-off"


@dataclass(frozen=True)
class AnalysisOrder:
    """What the requester said beyond the image: who ordered it, and for whom.

    ``ordering_practitioner`` is a FHIR reference (``Practitioner/123``, ``CareTeam/haem``) that a
    blast alert Communication is addressed to. ``patient`` fills in demographics that a plain
    image cannot carry (DICOM input carries its own).
    """

    ordering_practitioner: str | None = None
    patient: PatientInfo | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ordering_practitioner": self.ordering_practitioner}
        if self.patient is not None:
            patient = dataclasses.asdict(self.patient)
            if self.patient.birth_date:
                patient["birth_date"] = self.patient.birth_date.isoformat()
            data["patient"] = patient
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnalysisOrder:
        patient = data.get("patient")
        if patient:
            from datetime import date

            birth = patient.get("birth_date")
            patient = PatientInfo(
                **{**patient, "birth_date": date.fromisoformat(birth) if birth else None}
            )
        return cls(ordering_practitioner=data.get("ordering_practitioner"), patient=patient)


@dataclass(frozen=True)
class PipelineResult:
    """Everything one run produced."""

    findings: Findings
    report: ReportBundle
    delivery_keys: tuple[str, ...]
    alert_key: str | None


class AnalysisPipeline:
    """ingest -> analyze -> report -> deliver, with the classifier loaded once."""

    def __init__(self, settings: Settings, outbox: Outbox | None = None) -> None:
        self.settings = settings
        self.outbox = outbox  # None: results stay local (nothing is queued for an EHR)
        self._classifier: CellClassifier | None = None
        self._classifier_lock = threading.Lock()

    # ---- the model, loaded once ------------------------------------------------------------
    @property
    def classifier(self) -> CellClassifier:
        """The cell classifier (``settings.model.path``, or the bundled demo model)."""
        if self._classifier is None:
            with self._classifier_lock:
                if self._classifier is None:
                    self._classifier = load_classifier(
                        self.settings.model.path, device=self.settings.model.device
                    )
        return self._classifier

    @property
    def model_info(self) -> ModelInfo:
        return self.classifier.info

    # ---- stages ----------------------------------------------------------------------------
    def ingest(
        self,
        path: Path,
        *,
        transport: Transport,
        scope: Scope | None = None,
        order: AnalysisOrder | None = None,
    ) -> Acquisition:
        """Open a received file as an :class:`Acquisition` (pixels stay lazy)."""
        acquisition = open_acquisition(
            path, image_settings=self.settings.image, transport=transport, scope=scope
        )
        if order and order.patient and acquisition.patient == PatientInfo():
            acquisition = dataclasses.replace(acquisition, patient=order.patient)
        return acquisition

    def analyze(self, acquisition: Acquisition) -> Findings:
        """Detect and classify the cells of an acquisition."""
        return analyze(acquisition, self.classifier, self.settings.image)

    def report(self, findings: Findings, now: datetime | None = None) -> ReportBundle:
        """Map findings to a preliminary FHIR report Bundle (with HTML and PDF renderings)."""
        return build_report_bundle(findings, self.settings.fhir, now=now, include_pdf=True)

    def deliver(
        self, findings: Findings, report: ReportBundle, order: AnalysisOrder | None = None
    ) -> tuple[tuple[str, ...], str | None]:
        """Put the report (and, when blasts are found, an alert Communication) in the outbox.

        Returns the outbox keys and the alert's key (None without blasts). Keys derive from the
        report identifier (and the alert's recipient), so a re-run after a crash does not send
        twice.
        """
        if self.outbox is None:
            return (), None
        key = f"{report.report_identifier}/{REPORT_KIND}"
        self.outbox.enqueue(key, report.bundle, REPORT_KIND)
        keys = [key]
        alert_key = None
        if findings.outcome == Outcome.BLASTS_DETECTED:
            recipient = order.ordering_practitioner if order else None
            communication = build_communication_bundle(
                report, self.settings.fhir, recipient=recipient
            )
            alert_key = f"{report.report_identifier}/{ALERT_KIND}" + (
                f"/{recipient}" if recipient else ""
            )
            # The Communication refers to the report: send it only once the report is there.
            self.outbox.enqueue(alert_key, communication, ALERT_KIND, depends_on=key)
            keys.append(alert_key)
        return tuple(keys), alert_key

    def sign_off(
        self,
        report_bundle: dict[str, Any],
        *,
        report_identifier: str,
        practitioner_identifier: str,
        practitioner_name: str | None,
        comment: str | None = None,
        findings: Findings | None = None,
    ) -> tuple[str | None, dict[str, Any]]:
        """A clinician's review: build the Bundle that makes the report ``final`` and enqueue it.

        With ``findings`` the report's HTML/PDF renderings are redone to show the sign-off.
        Returns the outbox key (None without an outbox) and the Bundle. The key is fixed per
        report, so a report is signed off once in the EHR whatever happens to the request.
        """
        bundle = build_signoff_bundle(
            report_bundle,
            practitioner_identifier=practitioner_identifier,
            practitioner_name=practitioner_name,
            comment=comment,
            findings=findings,
        )
        if self.outbox is None:
            return None, bundle
        key = f"{report_identifier}/{SIGNOFF_KIND}"
        self.outbox.enqueue(
            key, bundle, SIGNOFF_KIND, depends_on=f"{report_identifier}/{REPORT_KIND}"
        )
        return key, bundle

    def run(
        self,
        path: Path,
        *,
        transport: Transport,
        scope: Scope | None = None,
        order: AnalysisOrder | None = None,
        on_ingested: Callable[[Acquisition], None] | None = None,
    ) -> PipelineResult:
        """All stages for one received file.

        ``on_ingested`` sees the acquisition while its pixels are open (the service uses it to
        keep a preview image for the clinician's page).
        """
        acquisition = self.ingest(path, transport=transport, scope=scope, order=order)
        try:
            if on_ingested is not None:
                on_ingested(acquisition)
            findings = self.analyze(acquisition)
            report = self.report(findings)  # may read pixels (the report's image)
        finally:
            acquisition.pixels.close()
        keys, alert_key = self.deliver(findings, report, order)
        return PipelineResult(findings, report, keys, alert_key)
