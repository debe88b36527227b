"""C-STORE received -> analysis done latency for a single-cell image (p50 / p99).

A real pynetdicom SCU sends a PBC cell image (VL Microscopic, JPEG baseline) to our
CStoreReceiver on loopback, one instance at a time. The receiver validates and spools it
durably, then its callback queues it; a worker thread opens it and runs the CELL analysis with
the bundled demo model. Printed per instance: from the C-STORE request leaving the SCU to the
findings being ready ("send -> done"), and from the instance being spooled (callback entry) to
the findings ("spooled -> done"), plus the C-STORE round trip alone.
Usage: nice -n 10 .venv/bin/python benchmarks/adapters_cstore_latency.py [--n 100]
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE

from leuk_fhir.acquisition import DicomReference, Transport
from leuk_fhir.adapters import open_acquisition
from leuk_fhir.adapters.dicom_scp import CStoreReceiver
from leuk_fhir.adapters.synthetic import dicom_microscopy_dataset
from leuk_fhir.analysis import analyze
from leuk_fhir.model import load_classifier
from leuk_fhir.settings import DicomSettings, ImageSettings

DEFAULT_PBC = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "pbc" / "lymphocyte"
)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--pbc", type=Path, default=DEFAULT_PBC)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    clf = load_classifier(device="cpu")
    cells = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(args.pbc.glob("*"))[:20]]
    spooled_at: dict[str, float] = {}
    done_at: dict[str, float] = {}
    jobs: queue.Queue[tuple[Path, DicomReference] | None] = queue.Queue()
    finished = threading.Condition()

    def on_instance(path: Path, ref: DicomReference) -> None:
        spooled_at[ref.sop_instance_uid or ""] = time.perf_counter()
        jobs.put((path, ref))

    def worker() -> None:
        while (item := jobs.get()) is not None:
            path, ref = item
            acq = open_acquisition(
                path, transport=Transport.C_STORE, calling_ae_title=ref.calling_ae_title
            )
            findings = analyze(acq, clf, ImageSettings())
            assert len(findings.cells) == 1
            with finished:
                done_at[ref.sop_instance_uid or ""] = time.perf_counter()
                finished.notify_all()

    threading.Thread(target=worker, daemon=True).start()
    send_done, spool_done, round_trip = [], [], []
    with (
        tempfile.TemporaryDirectory() as spool,
        CStoreReceiver(DicomSettings(port=0), Path(spool), on_instance) as rx,
    ):
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.2", JPEGBaseline8Bit)
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="LEUKFHIR")
        for i in range(args.n + 3):
            ds = dicom_microscopy_dataset(
                cells[i % len(cells)], transfer_syntax=JPEGBaseline8Bit, pixel_spacing_um=0.07
            )
            uid = ds.SOPInstanceUID
            t0 = time.perf_counter()
            status = assoc.send_c_store(ds)
            t1 = time.perf_counter()
            assert status.Status == 0, status
            with finished:
                finished.wait_for(lambda uid=uid: uid in done_at, timeout=60)
            if i >= 3:  # the first instances warm up the model
                send_done.append(done_at[uid] - t0)
                spool_done.append(done_at[uid] - spooled_at[uid])
                round_trip.append(t1 - t0)
        assoc.release()
        jobs.put(None)
    print(
        f"single-cell VL Microscopic image, JPEG baseline, 360x363 px; n = {args.n}; torch threads 2"
    )
    for name, values in (
        ("send -> done", send_done),
        ("spooled -> done", spool_done),
        ("C-STORE round trip", round_trip),
    ):
        print(f"{name:20s} p50 {pct(values, 50):7.1f} ms   p99 {pct(values, 99):7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
