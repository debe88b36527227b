"""Fixtures for the service tests: settings in a temporary data dir, apps, a live server."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from PIL import Image

from leuk_fhir.model.synthetic import generate_cell
from leuk_fhir.service import create_app
from leuk_fhir.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded defaults in a fresh data dir; no DICOM listener, no EHR."""
    return Settings().replace(data_dir=tmp_path / "data", dicom__enabled=False, service__workers=1)


def png_bytes(kind: str = "blast", seed: int = 0) -> bytes:
    """A synthetic cell (leuk_fhir.model.synthetic) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(generate_cell(kind, seed)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def cell_png() -> Callable[..., bytes]:
    """``cell_png(kind="blast", seed=0)``: a synthetic cell image as PNG bytes."""
    return png_bytes


@pytest.fixture
def make_app(settings: Settings) -> Iterator[Callable[..., Flask]]:
    """Build apps (not started unless ``start=True``); all are stopped at teardown."""
    apps: list[Flask] = []

    def factory(start: bool = False, settings_: Settings | None = None, **config: Any) -> Flask:
        app = create_app(settings_ or settings, {"START_SERVICE": start, "TESTING": True, **config})
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["leuk_fhir"].stop()
        app.extensions["leuk_fhir"].outbox.close()


class LiveServer:
    """The app behind a real waitress server on a loopback port, in a thread."""

    def __init__(self, app: Flask) -> None:
        import waitress

        self.app = app
        self.server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"  # type: ignore[union-attr]
        self.closing = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except (OSError, ValueError):
            if not self.closing:  # closing the socket under select() is how waitress stops
                raise

    def close(self) -> None:
        self.closing = True
        self.app.extensions["leuk_fhir"].broker.close()  # ends open event streams
        self.server.close()
        self.thread.join(10)


@pytest.fixture
def live_server() -> Iterator[Callable[[Flask], LiveServer]]:
    servers: list[LiveServer] = []

    def start(app: Flask) -> LiveServer:
        server = LiveServer(app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def wait_for(client, analysis_id: str, timeout_s: float = 120.0) -> dict:
    """Poll an analysis until it is completed or failed; its API view."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/analyses/{analysis_id}").get_json()
        if body["status"] in ("completed", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"analysis {analysis_id} did not finish in {timeout_s}s")


@pytest.fixture
def running_app(make_app):
    """A started app (workers, demo model) once it is ready."""
    app = make_app(start=True)
    client = app.test_client()
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").get_json()
        time.sleep(0.1)
    return app
