"""Pull a study from a PACS over DICOMweb: QIDO-RS lists its instances, WADO-RS fetches them.

Instances are fetched one at a time in their stored transfer syntax (``transfer-syntax=*``),
validated and spooled durably like C-STORE and STOW-RS input, so a large study never sits in
memory whole. Instances we cannot analyse (other SOP classes: reports, labels in other
classes) are skipped and listed, not fatal.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import requests
from pydicom import dcmwrite

from leuk_fhir.acquisition import DicomReference
from leuk_fhir.adapters.dicom_files import validate_dicom
from leuk_fhir.adapters.dicom_metadata import ACCEPTED_SOP_CLASSES, dicom_reference
from leuk_fhir.adapters.spool import durable_write, spool_path
from leuk_fhir.errors import InputError, LeukFhirError, NotFoundError
from leuk_fhir.settings import ImageSettings

DEFAULT_IMAGE_SETTINGS = ImageSettings()
log = logging.getLogger(__name__)

SOP_CLASS_TAG = "00080016"
SERIES_TAG = "0020000E"
SOP_INSTANCE_TAG = "00080018"


class DicomWebError(LeukFhirError):
    """The PACS could not be reached or answered with an error."""

    code = "dicomweb-pull"
    http_status = 502
    exit_code = 5


@dataclass
class PulledStudy:
    study_uid: str
    stored: list[tuple[Path, DicomReference]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (SOP instance UID, reason)

    @property
    def study_dir(self) -> Path | None:
        return self.stored[0][0].parent if self.stored else None


def _first(attrs: dict, tag: str) -> str | None:
    values = attrs.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def pull_study(
    url: str,
    study_uid: str,
    spool_dir: Path,
    *,
    image_settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    session: requests.Session | None = None,
    timeout_s: float = 60.0,
    attempts: int = 3,
) -> PulledStudy:
    """Fetch every analysable instance of ``study_uid`` from the DICOMweb service at ``url``.

    ``attempts`` > 1 retries 408/429/503/504 answers with exponential back-off.
    """
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=attempts > 1, max_attempts=max(attempts, 1))
    try:
        instances = client.search_for_instances(study_instance_uid=study_uid, get_remaining=True)
    except requests.HTTPError as exc:
        raise DicomWebError(f"QIDO-RS search at {url} failed: {exc}") from exc
    except requests.RequestException as exc:
        raise DicomWebError(f"cannot reach the DICOMweb service at {url}: {exc}") from exc
    if not instances:
        raise NotFoundError(f"study {study_uid} has no instances at {url}")
    result = PulledStudy(study_uid)
    for attrs in instances:
        sop_class = _first(attrs, SOP_CLASS_TAG)
        series_uid = _first(attrs, SERIES_TAG)
        sop_uid = _first(attrs, SOP_INSTANCE_TAG)
        if not series_uid or not sop_uid:
            result.skipped.append((sop_uid or "?", "QIDO-RS result lacks series/instance UID"))
            continue
        if sop_class and sop_class not in ACCEPTED_SOP_CLASSES:
            result.skipped.append((sop_uid, f"SOP class {sop_class} is not analysed"))
            continue
        try:
            ds = client.retrieve_instance(
                study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),)
            )
        except requests.RequestException as exc:
            raise DicomWebError(f"WADO-RS retrieve of instance {sop_uid} failed: {exc}") from exc
        try:
            validate_dicom(ds, image_settings, name=f"instance {sop_uid}")
        except (InputError, LeukFhirError) as exc:
            result.skipped.append((sop_uid, str(exc)))
            continue
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        ref = dicom_reference(ds)
        path = durable_write(
            spool_path(spool_dir, ref.study_uid, ref.sop_instance_uid), buffer.getvalue()
        )
        result.stored.append((path, ref))
        del ds, buffer
    return result
