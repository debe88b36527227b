"""Durable spooling of received DICOM instances: write to a temp file, fsync, rename.

A file appears under its final name only once it is complete on disk, so nothing half-written
is ever picked up for analysis, and a crash leaves at worst a ``.part`` file in ``.incoming``.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
INCOMING = ".incoming"


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


def durable_write(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically and durably; returns ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = target.parent / INCOMING
    incoming.mkdir(exist_ok=True)
    tmp = incoming / f"{uuid.uuid4().hex}.part"
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def spool_path(spool_dir: Path, study_uid: str | None, sop_instance_uid: str | None) -> Path:
    """``<spool>/<study UID>/<SOP instance UID>.dcm``: re-sending an instance overwrites it."""
    return Path(spool_dir) / safe_uid(study_uid) / f"{safe_uid(sop_instance_uid)}.dcm"
