"""Durable state of the service in one SQLite file under ``data_dir``: analyses and API tokens.

An analysis row is written (with its upload already on disk) before the API answers 202, so
nothing accepted is lost across a restart: on start-up every ``queued`` or ``running`` row is
queued again. Tokens are stored as sha256 hashes only; the clear token is shown once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leuk_fhir.errors import ConfigurationError, ConflictError, NotFoundError

ROLES = ("device", "clinician", "admin")

#: Analysis lifecycle. ``queued`` and ``running`` are re-queued on start-up.
QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
UNFINISHED = (QUEUED, RUNNING)
#: An analysis started this many times without finishing (it took the process down) is failed.
MAX_ATTEMPTS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS analyses (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    transport TEXT NOT NULL,
    scope TEXT,
    filename TEXT,
    media_type TEXT,
    upload_path TEXT NOT NULL,
    content_sha256 TEXT,
    submitted_by TEXT,
    order_json TEXT,
    error_code TEXT,
    error_message TEXT,
    result_json TEXT,
    outcome TEXT,
    blast_percentage REAL,
    report_identifier TEXT,
    report_status TEXT,
    delivery_keys TEXT,
    signed_off_by TEXT,
    signed_off_role TEXT,
    signed_off_at TEXT,
    signoff_comment TEXT
);
CREATE INDEX IF NOT EXISTS analyses_status ON analyses(status);
CREATE INDEX IF NOT EXISTS analyses_created ON analyses(created_at);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
"""


def utc_now() -> str:
    """Current time as an ISO 8601 instant with time zone."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_analysis_id() -> str:
    """A new analysis id (letters first, so it is never purely numeric)."""
    return "an-" + uuid.uuid4().hex


@dataclass(frozen=True)
class AnalysisRecord:
    """One row of the ``analyses`` table, decoded."""

    id: str
    created_at: str
    updated_at: str
    status: str
    attempts: int
    transport: str
    scope: str | None
    filename: str | None
    media_type: str | None
    upload_path: Path
    content_sha256: str | None
    submitted_by: str | None
    order: dict[str, Any]
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None
    outcome: str | None
    blast_percentage: float | None
    report_identifier: str | None
    report_status: str | None
    delivery_keys: list[str]
    signed_off_by: str | None
    signed_off_role: str | None
    signed_off_at: str | None
    signoff_comment: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AnalysisRecord:
        data = dict(row)
        return cls(
            id=data["id"],
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            status=data["status"],
            attempts=data["attempts"],
            transport=data["transport"],
            scope=data["scope"],
            filename=data["filename"],
            media_type=data["media_type"],
            upload_path=Path(data["upload_path"]),
            content_sha256=data["content_sha256"],
            submitted_by=data["submitted_by"],
            order=json.loads(data["order_json"] or "{}"),
            error_code=data["error_code"],
            error_message=data["error_message"],
            result=json.loads(data["result_json"]) if data["result_json"] else None,
            outcome=data["outcome"],
            blast_percentage=data["blast_percentage"],
            report_identifier=data["report_identifier"],
            report_status=data["report_status"],
            delivery_keys=json.loads(data["delivery_keys"] or "[]"),
            signed_off_by=data["signed_off_by"],
            signed_off_role=data["signed_off_role"],
            signed_off_at=data["signed_off_at"],
            signoff_comment=data["signoff_comment"],
        )


@dataclass(frozen=True)
class ApiToken:
    """A stored API token (never the clear text)."""

    id: str
    name: str
    role: str
    created_at: str
    revoked_at: str | None


def hash_token(token: str) -> str:
    """sha256 of a clear token. Tokens are 256-bit random, so a fast hash is enough."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ServiceStore:
    """SQLite-backed analyses and tokens. Thread-safe: one short connection per operation."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        try:
            yield db
        finally:
            db.close()

    def _update(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._write_lock, self._connect() as db:
            return db.execute(sql, params).rowcount

    def ping(self) -> None:
        """Raise when the database cannot be read."""
        with self._connect() as db:
            db.execute("SELECT 1").fetchone()

    # ---- analyses ----------------------------------------------------------------------
    def insert_analysis(
        self,
        analysis_id: str,
        *,
        transport: str,
        upload_path: Path,
        filename: str | None,
        media_type: str | None,
        content_sha256: str | None,
        scope: str | None = None,
        submitted_by: str | None = None,
        order: dict[str, Any] | None = None,
    ) -> AnalysisRecord:
        now = utc_now()
        self._update(
            "INSERT INTO analyses (id, created_at, updated_at, status, transport, scope, filename,"
            " media_type, upload_path, content_sha256, submitted_by, order_json)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                analysis_id, now, now, QUEUED, transport, scope, filename, media_type,
                str(upload_path), content_sha256, submitted_by, json.dumps(order or {}),
            ),
        )
        return self.get_analysis(analysis_id)

    def analysis_ids(self) -> set[str]:
        with self._connect() as db:
            return {row["id"] for row in db.execute("SELECT id FROM analyses")}

    def delete_analysis(self, analysis_id: str) -> None:
        self._update("DELETE FROM analyses WHERE id = ?", (analysis_id,))

    def get_analysis(self, analysis_id: str) -> AnalysisRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM analyses WHERE id = ?", (analysis_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no analysis {analysis_id!r}")
        return AnalysisRecord.from_row(row)

    def list_analyses(
        self, *, status: str | None = None, limit: int = 50, before: str | None = None
    ) -> list[AnalysisRecord]:
        """Newest first; ``before`` is a ``created_at`` cursor for paging."""
        clauses, params = [], []
        if status:
            clauses.append("status = ?")
            params.append(status)
        if before:
            clauses.append("created_at < ?")
            params.append(before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT * FROM analyses {where} ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [AnalysisRecord.from_row(r) for r in rows]

    def unfinished_analysis_ids(self, max_attempts: int = MAX_ATTEMPTS) -> list[str]:
        """Analyses to run again after a restart, oldest first. One that was started
        ``max_attempts`` times already (it keeps taking the process down) is failed instead;
        a sign-off cut short by the stop is undone (the report is preliminary again)."""
        with self._write_lock, self._connect() as db:
            db.execute(
                "UPDATE analyses SET status = ?, error_code = 'too-many-attempts',"
                " error_message = ?, updated_at = ? WHERE status IN (?, ?) AND attempts >= ?",
                (FAILED, f"stopped {max_attempts} times while running; not retried",
                 utc_now(), *UNFINISHED, max_attempts),
            )
            db.execute("UPDATE analyses SET report_status = 'preliminary'"
                       " WHERE report_status = 'signing'")
            rows = db.execute(
                "SELECT id FROM analyses WHERE status IN (?, ?) ORDER BY created_at",
                UNFINISHED,
            ).fetchall()
        return [r["id"] for r in rows]

    def count_by_status(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM analyses GROUP BY status")
            return {r["status"]: r["n"] for r in rows}

    def mark_running(self, analysis_id: str) -> None:
        self._update(
            "UPDATE analyses SET status = ?, attempts = attempts + 1, updated_at = ? WHERE id = ?",
            (RUNNING, utc_now(), analysis_id),
        )

    def mark_completed(
        self,
        analysis_id: str,
        *,
        result: dict[str, Any],
        outcome: str,
        blast_percentage: float | None,
        report_identifier: str,
        delivery_keys: list[str],
    ) -> None:
        self._update(
            "UPDATE analyses SET status = ?, updated_at = ?, result_json = ?, outcome = ?,"
            " blast_percentage = ?, report_identifier = ?, report_status = 'preliminary',"
            " delivery_keys = ?, error_code = NULL, error_message = NULL WHERE id = ?",
            (
                COMPLETED, utc_now(), json.dumps(result), outcome, blast_percentage,
                report_identifier, json.dumps(delivery_keys), analysis_id,
            ),
        )

    def mark_failed(self, analysis_id: str, *, code: str, message: str) -> None:
        self._update(
            "UPDATE analyses SET status = ?, updated_at = ?, error_code = ?, error_message = ?"
            " WHERE id = ?",
            (FAILED, utc_now(), code, message, analysis_id),
        )

    def claim_sign_off(self, analysis_id: str) -> AnalysisRecord:
        """preliminary -> signing, for one request only: the first of two concurrent sign-offs
        wins and the other gets :class:`ConflictError` before it has built or written anything.
        Also a conflict: the same report (the same image for the same patient, submitted twice)
        already signed off through another analysis."""
        with self._write_lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT * FROM analyses WHERE id = ?", (analysis_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no analysis {analysis_id!r}")
                record = AnalysisRecord.from_row(row)
                if record.status != COMPLETED or record.report_status != "preliminary":
                    state = {"signing": "being signed off"}.get(
                        record.report_status or "", record.report_status or "not yet issued")
                    raise ConflictError(
                        f"analysis {analysis_id} cannot be signed off: status {record.status},"
                        f" report {state}",
                        hint="only a completed analysis with a preliminary report can be signed off",
                    )
                other = db.execute(
                    "SELECT id FROM analyses WHERE report_identifier = ? AND id != ?"
                    " AND report_status IN ('signing', 'final')",
                    (record.report_identifier, analysis_id),
                ).fetchone()
                if other is not None:
                    raise ConflictError(
                        f"report {record.report_identifier} was already signed off through "
                        f"analysis {other['id']} (the same image for the same patient)",
                        hint=f"see analysis {other['id']}",
                    )
                db.execute(
                    "UPDATE analyses SET report_status = 'signing', updated_at = ? WHERE id = ?",
                    (utc_now(), analysis_id),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return AnalysisRecord.from_row(row)

    def release_sign_off(self, analysis_id: str) -> None:
        """Undo :meth:`claim_sign_off` after a sign-off failed."""
        self._update(
            "UPDATE analyses SET report_status = 'preliminary' WHERE id = ?"
            " AND report_status = 'signing'",
            (analysis_id,),
        )

    def record_sign_off(
        self,
        analysis_id: str,
        *,
        signed_off_by: str,
        role: str,
        comment: str | None,
        delivery_key: str | None,
    ) -> AnalysisRecord:
        """signing -> final (after :meth:`claim_sign_off`), with the person recorded."""
        with self._write_lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM analyses WHERE id = ?", (analysis_id,)).fetchone()
            if row is None or row["report_status"] != "signing":
                db.execute("ROLLBACK")
                raise ConflictError(f"analysis {analysis_id} was not claimed for sign-off")
            record = AnalysisRecord.from_row(row)
            keys = record.delivery_keys + ([delivery_key] if delivery_key else [])
            db.execute(
                "UPDATE analyses SET report_status = 'final', signed_off_by = ?,"
                " signed_off_role = ?, signed_off_at = ?, signoff_comment = ?, delivery_keys = ?,"
                " updated_at = ? WHERE id = ?",
                (signed_off_by, role, utc_now(), comment, json.dumps(keys), utc_now(), analysis_id),
            )
            db.execute("COMMIT")
        return self.get_analysis(analysis_id)

    # ---- tokens ------------------------------------------------------------------------
    def create_token(self, *, name: str, role: str) -> tuple[ApiToken, str]:
        """Create a token; returns the stored record and the clear token (shown once)."""
        if role not in ROLES:
            raise ConfigurationError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")
        if not name.strip():
            raise ConfigurationError("a token needs a name (the person or device it is for)")
        clear = "lfx_" + secrets.token_urlsafe(32)
        token_id = "tok-" + uuid.uuid4().hex[:12]
        now = utc_now()
        self._update(
            "INSERT INTO api_tokens (id, name, role, token_sha256, created_at) VALUES (?,?,?,?,?)",
            (token_id, name.strip(), role, hash_token(clear), now),
        )
        return ApiToken(token_id, name.strip(), role, now, None), clear

    def find_token(self, clear: str) -> ApiToken | None:
        """The active token matching ``clear``, or None."""
        with self._connect() as db:
            row = db.execute(
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens"
                " WHERE token_sha256 = ? AND revoked_at IS NULL",
                (hash_token(clear),),
            ).fetchone()
        return ApiToken(**dict(row)) if row else None

    def list_tokens(self) -> list[ApiToken]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at"
            ).fetchall()
        return [ApiToken(**dict(r)) for r in rows]

    def revoke_token(self, token_id: str) -> None:
        if not self._update(
            "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (utc_now(), token_id),
        ):
            raise NotFoundError(f"no active token {token_id!r}")
