"""Fixtures for the whole suite: the real HAPI FHIR test server and per-module FHIR namespaces.

`fhir_base` is the base URL of a HAPI FHIR JPA server (FHIR R4, request validation on; see
docs/hapi-test-server.md). `bash scripts/test` starts one and names it in
``LEUK_FHIR_TEST_FHIR_BASE``; without that variable the fixture reuses a server already answering
on ``LEUK_FHIR_TEST_HAPI_PORT`` (default 8080) or starts one with ``tests/hapi-server/run`` and
stops it at the end of the session. If no server can be had, tests using it ERROR, never skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

HAPI_SERVER_DIR = Path(__file__).resolve().parent / "hapi-server"
FHIR_BASE_ENV = "LEUK_FHIR_TEST_FHIR_BASE"
HAPI_PORT_ENV = "LEUK_FHIR_TEST_HAPI_PORT"
FHIR_JSON = "application/fhir+json"
#: Build (first time: Maven downloads) plus start-up on a busy 2-core machine.
HAPI_START_TIMEOUT_S = 1200


def _metadata_answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/metadata", headers={"Accept": FHIR_JSON}, timeout=20).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="session")
def fhir_base() -> Iterator[str]:
    """Base URL (no trailing slash) of the session's real HAPI FHIR R4 server."""
    given = os.environ.get(FHIR_BASE_ENV, "").strip().rstrip("/")
    if given:
        if not _metadata_answers(given):
            pytest.fail(f"{FHIR_BASE_ENV}={given} but GET {given}/metadata does not answer",
                        pytrace=False)
        yield given
        return
    port = os.environ.get(HAPI_PORT_ENV, "8080")
    local = f"http://127.0.0.1:{port}/fhir"
    if _metadata_answers(local):
        yield local
        return
    run = subprocess.run(["bash", str(HAPI_SERVER_DIR / "run"), "--port", port],
                         capture_output=True, text=True, timeout=HAPI_START_TIMEOUT_S, check=False)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        pytest.fail(f"tests/hapi-server/run --port {port} failed (exit {run.returncode}):\n"
                    f"{run.stderr[-4000:]}", pytrace=False)
    try:
        yield lines[-1].strip()
    finally:
        subprocess.run(["bash", str(HAPI_SERVER_DIR / "stop"), "--port", port],
                       capture_output=True, timeout=120, check=False)


@dataclass(frozen=True)
class FhirTestNamespace:
    """Identifiers unique to one test module and session, so tests never see each other's data.

    Use `identifier(value)` in resources, `token(value)` in searches, and `expunge(type)` to
    delete (with everything that references them) and physically remove the module's resources.
    """

    base: str
    system: str

    def identifier(self, value: str) -> dict[str, str]:
        """A FHIR Identifier in this namespace."""
        return {"system": self.system, "value": value}

    def token(self, value: str = "") -> str:
        """Token search value `system|value`; an empty value matches the whole namespace."""
        return f"{self.system}|{value}"

    def expunge(self, *resource_types: str) -> list[str]:
        """Delete the namespace's resources of the given types and `$expunge` them for good;
        returns their ids. Resources of unlisted types that reference them are deleted too
        (cascade) but stay as deleted versions."""
        return expunge(self.base, resource_types, {"identifier": self.token()})


def expunge(base: str, resource_types: tuple[str, ...] | list[str],
            search: dict[str, str]) -> list[str]:
    """Delete the resources of `resource_types` that `search` finds (cascading to the resources
    that reference them) and remove them for good with HAPI's instance-level `$expunge`.

    Returns the expunged ids (`Type/id`). Only these resources are touched, so it is safe on a
    server that other test sessions share.
    """
    headers = {"Accept": FHIR_JSON, "Cache-Control": "no-cache"}
    ids: list[str] = []
    for resource_type in resource_types:  # all ids first: a cascade hides referrers from search
        found = requests.get(f"{base}/{resource_type}",
                             params={**search, "_elements": "id", "_count": "1000"},
                             headers=headers, timeout=120)
        _raise_for_fhir_error(found, f"search {resource_type}?{search}")
        ids += [f"{resource_type}/{e['resource']['id']}" for e in found.json().get("entry", [])]
    for resource_type in resource_types:
        deleted = requests.delete(f"{base}/{resource_type}",
                                  params={**search, "_cascade": "delete"},
                                  headers=headers, timeout=120)
        _raise_for_fhir_error(deleted, f"DELETE {resource_type}?{search}")
    parameters: dict[str, Any] = {
        "resourceType": "Parameters",
        "parameter": [{"name": "expungeDeletedResources", "valueBoolean": True},
                      {"name": "expungePreviousVersions", "valueBoolean": True}],
    }
    for resource_id in ids:
        expunged = requests.post(f"{base}/{resource_id}/$expunge", json=parameters,
                                 headers={**headers, "Content-Type": FHIR_JSON}, timeout=120)
        _raise_for_fhir_error(expunged, f"{resource_id}/$expunge")
    return ids


def _raise_for_fhir_error(response: requests.Response, what: str) -> None:
    if response.status_code >= 400:
        raise RuntimeError(f"{what} failed: HTTP {response.status_code} {response.text[:500]}")


@pytest.fixture(scope="module")
def fhir_namespace(request: pytest.FixtureRequest, fhir_base: str) -> FhirTestNamespace:
    """A `FhirTestNamespace` for the requesting test module (fresh in every session)."""
    module = re.sub(r"[^A-Za-z0-9-]+", "-", request.module.__name__.rsplit(".", 1)[-1])
    return FhirTestNamespace(base=fhir_base,
                             system=f"urn:leuk-fhir:test:{module}:{uuid.uuid4().hex[:12]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI (``CI`` set) a skip is a failure: every peer (Orthanc, Chromium, dcmtk, the shared
    datasets) must be there, so a missing install step cannot hide behind a green run."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be missing: {report.longrepr}"


class SmallDisk:
    """A real file system of a few MiB (tmpfs), to fill up: a full disk cannot be had any
    other honest way. ``fill(leave)`` writes a filler file until ``leave`` bytes are free;
    ``free()`` removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def available(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self, leave: int = 0) -> None:
        with self.filler.open("ab") as out:
            while (room := self.available() - leave) > 0:
                try:
                    out.write(b"\0" * min(room, 1 << 20))
                    out.flush()
                except OSError:
                    break

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 16 MiB tmpfs mounted for the test (needs root, as the CI machine runs; skipped
    without the right to mount)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallDisk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
