"""FHIR delivery figures: Bundle build time, push latency to HAPI, sustained outbox throughput.

Usage::

    .venv/bin/python benchmarks/fhir_delivery.py [--fhir-base URL] [--pushes 100] [--reports 200]

Needs a running HAPI FHIR server (``tests/hapi-server/run --port 8080``) for the push and
outbox figures; prints the build figures alone otherwise. Each run writes under fresh
identifier systems, so figures are for first-time creates (the realistic case).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import requests

from leuk_fhir.acquisition import Acquisition, Level, PatientInfo, Scope, SpecimenInfo, Tile
from leuk_fhir.delivery import EhrClient, Outbox, OutboxSender
from leuk_fhir.fhir import build_report_bundle
from leuk_fhir.findings import CellClass, CellFinding, Findings, ModelInfo
from leuk_fhir.settings import FhirSettings, OutboxSettings


class ArrayPixelSource:
    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    levels = property(lambda self: (Level(self._a.shape[1], self._a.shape[0]),))
    frame_count = 1
    microns_per_pixel = None

    def read_frame(self, index: int = 0) -> np.ndarray:
        return self._a

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        return self._a[y : y + height, x : x + width]

    def iter_tiles(self, tile_size: int, level: int = 0, overlap: int = 0):  # pragma: no cover
        yield Tile(0, 0, 0, self._a)

    def close(self) -> None:
        pass


CLASSES = (CellClass("blast", "Lymphoblast", True, "15433008", "Lymphoblast"),
           CellClass("lymphocyte", "Lymphocyte", False, "56972008", "Lymphocyte"))
MODEL = ModelInfo("leuk-hosvd-bench", "1.0.0", hashlib.sha256(b"bench").hexdigest(), CLASSES,
                  metrics={"accuracy_mean": 0.97})
BCCD_FIELD = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg"


def _field_image() -> np.ndarray:
    """A real smear field (BCCD, 640x480) when the shared datasets are there, else noise."""
    try:
        from PIL import Image

        return np.asarray(Image.open(BCCD_FIELD).convert("RGB"))
    except OSError:
        return np.random.default_rng(0).integers(150, 255, (480, 640, 3), dtype=np.uint8)


IMAGE = _field_image()


def findings(tag: str, i: int, cells: int = 20) -> Findings:
    acq = Acquisition(source_id=f"{tag}-{i}", pixels=ArrayPixelSource(IMAGE), scope=Scope.FIELD,
                      filename=f"field-{i}.png", media_type="image/png",
                      acquired_at=datetime(2026, 11, 20, 9, 0, tzinfo=UTC),
                      patient=PatientInfo(identifier=f"MRN-{i % 50}"), specimen=SpecimenInfo(identifier=f"SP-{tag[:6]}-{i}"))
    found = tuple(
        CellFinding("blast" if k % 4 == 0 else "lymphocyte", {"blast": 0.8, "lymphocyte": 0.2},
                    box=(30 * k % 560, 50 * k % 400, 80, 80)) for k in range(cells))
    return Findings(acq, MODEL, found)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fhir-base", default=os.environ.get("LEUK_FHIR_TEST_FHIR_BASE", "http://127.0.0.1:8080/fhir"))
    ap.add_argument("--builds", type=int, default=20)
    ap.add_argument("--pushes", type=int, default=100)
    ap.add_argument("--reports", type=int, default=200)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}")
    tag = uuid.uuid4().hex[:10]
    settings = FhirSettings(identifier_system=f"urn:leuk-fhir:report:bench-{tag}")

    for include_pdf in (True, False):
        times, sizes = [], []
        for i in range(args.builds):
            f = findings(tag + "b", i)
            t = time.perf_counter()
            rb = build_report_bundle(f, settings, include_pdf=include_pdf)
            times.append(time.perf_counter() - t)
            sizes.append(len(rb.pdf or b""))
        label = "with PDF+HTML" if include_pdf else "FHIR only    "
        print(f"build one Bundle ({label}, 640x480 BCCD field, 20 cells): "
              f"mean {1000 * statistics.mean(times):.1f} ms, p50 {1000 * pct(times, 50):.1f} ms"
              + (f", PDF {statistics.mean(sizes) / 1024:.0f} KiB" if include_pdf else ""))

    try:
        requests.get(f"{args.fhir_base}/metadata", timeout=10).raise_for_status()
    except requests.RequestException as exc:
        print(f"no HAPI at {args.fhir_base} ({exc}); push and outbox figures skipped")
        return 0
    client = EhrClient(args.fhir_base, timeout_s=120)
    client.capabilities()
    bundles = [build_report_bundle(findings(tag + "p", i), settings).bundle for i in range(args.pushes)]
    lat = []
    for b in bundles:
        t = time.perf_counter()
        client.post_transaction(b)
        lat.append(time.perf_counter() - t)
    print(f"push latency to HAPI ({args.fhir_base}, {args.pushes} new reports with PDF): "
          f"p50 {1000 * pct(lat, 50):.0f} ms, p99 {1000 * pct(lat, 99):.0f} ms, max {1000 * max(lat):.0f} ms")
    lat_again = []
    for b in bundles[:20]:
        t = time.perf_counter()
        client.post_transaction(b)
        lat_again.append(time.perf_counter() - t)
    print(f"re-push of an existing report (all conditional creates match): p50 {1000 * pct(lat_again, 50):.0f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        outbox = Outbox(Path(tmp) / "outbox.sqlite")
        t = time.perf_counter()
        for i in range(args.reports):
            rb = build_report_bundle(findings(tag + "o", i), settings)
            outbox.enqueue(rb.report_identifier, rb.bundle)
        t_enqueue = time.perf_counter() - t
        sender = OutboxSender(outbox, client, OutboxSettings(poll_interval_s=0.01))
        t = time.perf_counter()
        stats = sender.drain(timeout_s=1800)
        elapsed = time.perf_counter() - t
        outbox.close()
    print(f"outbox: built+enqueued {args.reports} reports in {t_enqueue:.1f} s "
          f"({args.reports / t_enqueue:.1f}/s, durable writes)")
    print(f"outbox: drained {stats['delivered']} reports to HAPI in {elapsed:.1f} s = "
          f"{stats['delivered'] / elapsed:.1f} reports/s sustained (one sender, HAPI on the same {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
