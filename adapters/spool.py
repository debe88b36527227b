"""Durable spooling of received DICOM instances: write to a temp file, fsync, rename.

A file appears under its final name only once it is complete on disk, so nothing half-written
is ever picked up for analysis, and a crash leaves at worst a ``.part`` file in ``.incoming``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from pathlib import Path

from leuk_fhir.errors import InputError, is_storage_full, storage_full_error

log = logging.getLogger(__name__)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
INCOMING = ".incoming"
#: Serialises the compare-and-rename of :func:`durable_write` with ``refuse_different``.
_RENAME_LOCK = threading.Lock()


def safe_uid(uid: str | None) -> str:
    """A UID usable as a file name (UIDs are digits and dots; anything else is hashed)."""
    text = (uid or "").strip()
    if _UID.match(text) and len(text) <= 64:
        return text
    return "x" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_content(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return True  # gone meanwhile (e.g. taken over for analysis): nothing to lose


def _spool_full(exc: BaseException, target: Path) -> Exception:
    """The typed error for a full spool disk; the path goes to the log, not to the sender."""
    log.error("spool disk full, %s not written: %s", target, exc)
    return storage_full_error(exc, "the DICOM spool")


def durable_write(target: Path, data: bytes, *, refuse_different: bool = False) -> Path:
    """Write ``data`` to ``target`` atomically and durably; returns ``target``.

    With ``refuse_different``, an existing ``target`` with other content is kept and
    :class:`~leuk_fhir.errors.InputError` raised: identical re-sends stay idempotent, but a
    different instance under a name already used is never silently overwritten. A full disk
    raises :class:`~leuk_fhir.errors.StorageFullError` and leaves no partial file.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        incoming = target.parent / INCOMING
        incoming.mkdir(exist_ok=True)
    except OSError as exc:
        if is_storage_full(exc):
            raise _spool_full(exc, target) from exc
        raise
    tmp = incoming / f"{uuid.uuid4().hex}.part"
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with _RENAME_LOCK:
            if refuse_different and target.exists() and not _same_content(target, data):
                raise InputError(
                    f"other content was already received under this SOP Instance UID "
                    f"({target.stem}): kept, this one refused",
                    hint="changed instances need a new SOP Instance UID",
                )
            os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_storage_full(exc):
            raise _spool_full(exc, target) from exc
        raise
    _fsync_dir(target.parent)
    return target


def spool_path(spool_dir: Path, study_uid: str | None, sop_instance_uid: str | None) -> Path:
    """``<spool>/<study UID>/<SOP instance UID>.dcm``; both UIDs are required (an empty one
    would make unrelated instances share a folder or a file name)."""
    for what, uid in (("Study", study_uid), ("SOP", sop_instance_uid)):
        if not (uid or "").strip():
            raise InputError(f"no {what} Instance UID: the instance cannot be filed")
    return Path(spool_dir) / safe_uid(study_uid) / f"{safe_uid(sop_instance_uid)}.dcm"
