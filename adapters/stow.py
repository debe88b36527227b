"""DICOMweb STOW-RS (PS3.18 section 10.5), without a web framework.

The service mounts it as ``POST /dicomweb/studies`` (and ``/dicomweb/studies/{study}``)::

    from leuk_fhir.adapters.stow import handle_stow
    result = handle_stow(request.get_data(), request.content_type,
                         spool_dir=..., image_settings=..., study_uid=None)
    # every result.stored[i].path is complete on disk: enqueue it for analysis
    return result.to_dicom_json(base_url), result.http_status,
           {"Content-Type": "application/dicom+json"}

Errors that concern the whole request raise (map with ``exc.http_status``):
:class:`~leuk_fhir.errors.UnsupportedFormatError` (415) when the body is not
``multipart/related; type="application/dicom"``, :class:`~leuk_fhir.errors.InputError` (400)
when the multipart body is malformed. Per-instance problems do not raise: they become items of
the FailedSOPSequence with a Failure Reason (the error's DICOM status), and the HTTP status is
200 (all stored), 202 (some stored) or 409 (none stored).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leuk_fhir.acquisition import DicomReference
from leuk_fhir.adapters.dicom_files import (
    check_first_frame,
    is_dicom_bytes,
    read_dicom,
    validate_dicom,
)
from leuk_fhir.adapters.dicom_metadata import dicom_reference
from leuk_fhir.adapters.spool import durable_write, spool_path
from leuk_fhir.errors import ImageTooLargeError, InputError, LeukFhirError, UnsupportedFormatError
from leuk_fhir.settings import ImageSettings

DEFAULT_IMAGE_SETTINGS = ImageSettings()
log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
DICOM_JSON_MEDIA_TYPE = "application/dicom+json"
#: Failure Reason (0008,1197) when an instance cannot be parsed at all.
FAILURE_CANNOT_UNDERSTAND = 0xC000
#: Failure Reason when an instance is not of the study named in the URL.
FAILURE_STUDY_MISMATCH = 0xA900
MAX_PARTS = 10_000


@dataclass(frozen=True)
class StowPart:
    """One body part of the multipart/related request."""

    headers: dict[str, str]
    data: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", DICOM_MEDIA_TYPE)


@dataclass(frozen=True)
class StowRequest:
    """A parsed STOW-RS request: its parts (each one DICOM Part 10 instance)."""

    parts: tuple[StowPart, ...]
    boundary: str


@dataclass(frozen=True)
class StoredInstance:
    path: Path
    reference: DicomReference


@dataclass(frozen=True)
class FailedInstance:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure_reason: int
    message: str


@dataclass
class StowResult:
    """What was stored and what failed, and the STOW-RS response built from it."""

    stored: list[StoredInstance] = field(default_factory=list)
    failed: list[FailedInstance] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_dicom_json(self, base_url: str | None = None) -> dict[str, Any]:
        """The response data set in DICOM JSON (PS3.18 F.2): ReferencedSOPSequence
        (0008,1199), FailedSOPSequence (0008,1198) with Failure Reason (0008,1197)."""
        out: dict[str, Any] = {}
        root = base_url.rstrip("/") if base_url else None
        studies = {s.reference.study_uid for s in self.stored}
        if root and len(studies) == 1:
            out["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{next(iter(studies))}"]}
        if self.stored:
            items = []
            for s in self.stored:
                item: dict[str, Any] = {
                    "00081150": {"vr": "UI", "Value": [s.reference.sop_class_uid or ""]},
                    "00081155": {"vr": "UI", "Value": [s.reference.sop_instance_uid or ""]},
                }
                if root:
                    ref = s.reference
                    item["00081190"] = {
                        "vr": "UR",
                        "Value": [
                            f"{root}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_instance_uid}"
                        ],
                    }
                items.append(item)
            out["00081199"] = {"vr": "SQ", "Value": items}
        if self.failed:
            out["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": [f.sop_class_uid]}
                        if f.sop_class_uid
                        else {"vr": "UI"},
                        "00081155": {"vr": "UI", "Value": [f.sop_instance_uid]}
                        if f.sop_instance_uid
                        else {"vr": "UI"},
                        "00081197": {"vr": "US", "Value": [f.failure_reason]},
                    }
                    for f in self.failed
                ],
            }
        return out


def _params(content_type: str) -> tuple[str, dict[str, str]]:
    main, *rest = content_type.split(";")
    params: dict[str, str] = {}
    for item in re.findall(
        r';\s*([A-Za-z0-9_\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', ";" + ";".join(rest)
    ):
        key, value = item
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        params[key.lower()] = value
    return main.strip().lower(), params


def parse_stow(body: bytes, content_type: str | None) -> StowRequest:
    """Split a ``multipart/related; type="application/dicom"`` body into its parts."""
    media, params = _params(content_type or "")
    if media != "multipart/related":
        raise UnsupportedFormatError(
            f"STOW-RS needs Content-Type multipart/related, got {media or 'none'!r}",
            hint='send multipart/related; type="application/dicom"; boundary=...',
        )
    part_type = params.get("type", DICOM_MEDIA_TYPE).lower()
    if part_type != DICOM_MEDIA_TYPE:
        raise UnsupportedFormatError(
            f"STOW-RS parts of type {part_type!r} are not accepted; only {DICOM_MEDIA_TYPE}",
            hint="send DICOM Part 10 instances (the JSON + bulk data form is not supported)",
        )
    boundary = params.get("boundary")
    if not boundary:
        raise InputError("multipart/related Content-Type has no boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise InputError("multipart body does not contain its boundary")
    parts: list[StowPart] = []
    pos = start + len(delimiter)
    while True:
        if body[pos : pos + 2] == b"--":
            break  # close delimiter
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise InputError("multipart body ends before its closing boundary (truncated)")
        header_end = body.find(b"\r\n\r\n", line_end)
        if header_end < 0:
            raise InputError("multipart part has no header/body separator")
        headers = _parse_headers(body[line_end + 2 : header_end])
        data_start = header_end + 4
        next_delim = body.find(b"\r\n" + delimiter, data_start)
        if next_delim < 0:
            raise InputError("multipart body ends before its closing boundary (truncated)")
        parts.append(StowPart(headers, body[data_start:next_delim]))
        if len(parts) > MAX_PARTS:
            raise InputError(f"more than {MAX_PARTS} parts in one STOW-RS request")
        pos = next_delim + 2 + len(delimiter)
    if not parts:
        raise InputError("STOW-RS request holds no instances")
    return StowRequest(tuple(parts), boundary)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return headers


def store_stow(
    request: StowRequest,
    *,
    spool_dir: Path,
    image_settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    study_uid: str | None = None,
) -> StowResult:
    """Validate and durably spool each part; failures are recorded, never raised."""
    result = StowResult()
    for index, part in enumerate(request.parts):
        name = f"part {index + 1}"
        sop_class = sop_instance = None
        try:
            media = part.content_type.split(";")[0].strip().lower()
            if media != DICOM_MEDIA_TYPE:
                raise UnsupportedFormatError(
                    f"{name} has Content-Type {media!r}, not {DICOM_MEDIA_TYPE}"
                )
            if len(part.data) > image_settings.max_bytes:
                raise ImageTooLargeError(
                    f"{name} is {len(part.data):,} bytes, above {image_settings.max_bytes:,}"
                )
            if not is_dicom_bytes(part.data[:132]):
                raise InputError(f"{name} is not a DICOM Part 10 file (no DICM preamble)")
            ds = read_dicom(part.data, name=name, max_bytes=image_settings.max_bytes)
            sop_class = str(ds.get("SOPClassUID", "")) or None
            sop_instance = str(ds.get("SOPInstanceUID", "")) or None
            if not sop_instance:
                raise InputError(f"{name} has no SOP Instance UID")
            validate_dicom(ds, image_settings, name=f"{name} ({sop_instance})")
            check_first_frame(ds, name)
            ref = dicom_reference(ds)
            if not ref.study_uid:
                raise InputError(f"{name} has no Study Instance UID (0020,000D)")
            if study_uid and ref.study_uid != study_uid:
                result.failed.append(
                    FailedInstance(
                        sop_class,
                        sop_instance,
                        FAILURE_STUDY_MISMATCH,
                        f"{name} belongs to study {ref.study_uid}, not {study_uid}",
                    )
                )
                continue
            path = durable_write(
                spool_path(spool_dir, ref.study_uid, ref.sop_instance_uid),
                part.data,
                refuse_different=True,
            )
        except LeukFhirError as exc:
            reason = exc.dicom_status if exc.dicom_status else FAILURE_CANNOT_UNDERSTAND
            log.warning("STOW-RS %s refused: %s", name, exc)
            result.failed.append(FailedInstance(sop_class, sop_instance, reason, str(exc)))
            continue
        result.stored.append(StoredInstance(path, ref))
    return result


def handle_stow(
    body: bytes,
    content_type: str | None,
    *,
    spool_dir: Path,
    image_settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    study_uid: str | None = None,
) -> StowResult:
    """Parse, validate and spool a STOW-RS request (see the module docstring)."""
    return store_stow(
        parse_stow(body, content_type),
        spool_dir=spool_dir,
        image_settings=image_settings,
        study_uid=study_uid,
    )


def build_stow_body(
    instances: list[bytes], boundary: str = "leuk-fhir-stow-boundary"
) -> tuple[bytes, str]:
    """A multipart/related body for ``instances`` and its Content-Type (for clients and tests)."""
    chunks = []
    for data in instances:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode() + data + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'
