"""Pull a study from a PACS over DICOMweb: QIDO-RS lists its instances, WADO-RS fetches them.

Instances are fetched one at a time in their stored transfer syntax (``transfer-syntax=*``),
validated and spooled durably like C-STORE and STOW-RS input, so a large study never sits in
memory whole. Every answer is read through :class:`BoundedSession`, which stops at
``image.max_bytes`` of decoded content (a gzip-encoded answer is counted as inflated), so a
PACS that sends a compression bomb or an endless body gets a :class:`DicomWebError`, not our
memory. Instances we cannot analyse (other SOP classes: reports, labels in other classes) are
skipped and listed, not fatal.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests
from pydicom import dcmwrite

from leuk_fhir.acquisition import DicomReference
from leuk_fhir.adapters.dicom_files import validate_dicom
from leuk_fhir.adapters.dicom_metadata import ACCEPTED_SOP_CLASSES, dicom_reference
from leuk_fhir.adapters.spool import durable_write, spool_path
from leuk_fhir.errors import InputError, LeukFhirError, NotFoundError
from leuk_fhir.http_body import BodyTooLargeError, read_body
from leuk_fhir.settings import ImageSettings

DEFAULT_IMAGE_SETTINGS = ImageSettings()
log = logging.getLogger(__name__)

SOP_CLASS_TAG = "00080016"
SERIES_TAG = "0020000E"
SOP_INSTANCE_TAG = "00080018"
#: Answers worth asking again for (the PACS is busy or timed out), as DICOMweb clients do.
RETRIABLE_STATUS = frozenset({408, 429, 503, 504})
#: First wait between attempts; it doubles each time.
RETRY_WAIT_S = 1.0

T = TypeVar("T")


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


class DicomWebTooLargeError(DicomWebError):
    """An answer from the PACS is larger than ``image.max_bytes`` once decoded."""

    code = "dicomweb-too-large"


class BoundedSession(requests.Session):
    """A :class:`requests.Session` that reads every answer whole, up to ``max_bytes`` of
    decoded content, and raises :class:`DicomWebTooLargeError` beyond it.

    Callers that asked for a stream get the same bytes from memory, so the bound holds however
    the DICOMweb library reads the answer.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
        kwargs["stream"] = True
        response = super().send(request, **kwargs)  # type: ignore[arg-type]
        declared = response.headers.get("Content-Length", "")
        encoded = response.headers.get("Content-Encoding", "identity").lower()
        try:
            if declared.isdigit() and encoded == "identity" and int(declared) > self.max_bytes:
                raise DicomWebTooLargeError(
                    self._too_large(request, f"declares {int(declared)} bytes")
                )
            response._content = read_body(response, self.max_bytes)
        except BodyTooLargeError:
            raise DicomWebTooLargeError(self._too_large(request, "goes on")) from None
        finally:
            response.close()
        return response

    def _too_large(self, request: requests.PreparedRequest, how: str) -> str:
        return (
            f"the answer to {request.method} {request.url} {how} beyond {self.max_bytes} bytes "
            f"(image.max_bytes); nothing of it was kept"
        )


def _with_retries(call: Callable[[], T], attempts: int, what: str) -> T:
    """``call()``, tried up to ``attempts`` times on connection errors, timeouts and
    :data:`RETRIABLE_STATUS` answers, with exponential back-off. An answer that is too large
    is not asked for again."""
    wait = RETRY_WAIT_S
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            return call()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in RETRIABLE_STATUS or attempt >= attempts:
                raise
            reason: object = status
        except (requests.ConnectionError, requests.Timeout) as exc:
            if attempt >= attempts:
                raise
            reason = exc
        log.warning("%s: attempt %d of %d failed (%s); again in %.0f s",
                    what, attempt, attempts, reason, wait)
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


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

    ``attempts`` > 1 retries connection errors, timeouts and 408/429/503/504 answers with
    exponential back-off. An instance whose answer is not DICOM is skipped. Every answer
    is bounded by ``image_settings.max_bytes`` (:class:`BoundedSession`; a ``session`` given
    here is used as it is).
    """
    from dicomweb_client import DICOMwebClient

    if session is None:
        session = BoundedSession(image_settings.max_bytes)
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)  # retried here, where a too-large answer is final
    try:
        instances = _with_retries(
            lambda: client.search_for_instances(study_instance_uid=study_uid, get_remaining=True),
            attempts,
            f"QIDO-RS search at {url}",
        )
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
            ds = _with_retries(
                functools.partial(
                    client.retrieve_instance,
                    study_uid,
                    series_uid,
                    sop_uid,
                    media_types=(("application/dicom", "*"),),
                ),
                attempts,
                f"WADO-RS retrieve of instance {sop_uid}",
            )
        except requests.RequestException as exc:
            raise DicomWebError(f"WADO-RS retrieve of instance {sop_uid} failed: {exc}") from exc
        except LeukFhirError:
            raise
        except Exception as exc:  # a body that is not a DICOM instance (pydicom, multipart)
            result.skipped.append(
                (sop_uid, f"WADO-RS answer is not a readable DICOM instance: {exc}")
            )
            continue
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
