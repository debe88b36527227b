"""Load the running service over loopback and PRINT what it sustains.

Starts ``leuk-fhir serve`` (embedded defaults, a fresh data dir, pinned to 2 CPU cores with
``taskset`` when available), submits synthetic cell images from several client threads for
``--duration`` seconds while other threads read analyses, then waits for the queue to drain and
prints: analyses per second sustained, API latency p50/p99 (submit and read), error rate,
back-pressure answers (503 queue full), and the server's resident memory.

    .venv/bin/python benchmarks/service_load.py --duration 60
    .venv/bin/python benchmarks/service_load.py --duration 600   # the issue's 10 minutes
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests


def _pngs(count: int) -> list[bytes]:
    from PIL import Image

    from leuk_fhir.model.synthetic import generate_cell

    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(generate_cell("blast" if i % 4 == 0 else "normal", 1000 + i)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            name, value = line.split(":")
            fields[name] = int(value.split()[0])
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (issue: 600)")
    parser.add_argument("--submitters", type=int, default=4, help="client threads submitting")
    parser.add_argument("--readers", type=int, default=2, help="client threads reading")
    parser.add_argument("--cores", default="0,1", help="CPU cores for the server (taskset)")
    parser.add_argument("--workers", type=int, default=2, help="service analysis workers")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="leuk-fhir-bench-"))
    env = {**os.environ, "LEUK_FHIR_SERVICE_RATE_LIMIT_PER_MINUTE": "0",
           "LEUK_FHIR_SERVICE_WORKERS": str(args.workers), "OMP_NUM_THREADS": "1",
           "LEUK_FHIR_SERVICE_QUEUE_SIZE": "32"}
    command = [sys.executable, "-m", "leuk_fhir", "serve", "--port", "0", "--no-dicom",
               "--data-dir", str(data_dir)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", args.cores, *command]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        url = None
        assert server.stdout is not None
        for line in server.stdout:
            match = re.search(r"serving (http://\S+?)/? ", line)
            if match:
                url = match.group(1).rstrip("/")
                break
        if url is None:
            print("server did not start", file=sys.stderr)
            return 1
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # type: ignore[union-attr]
        deadline = time.monotonic() + 180
        while requests.get(f"{url}/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                print("server not ready", file=sys.stderr)
                return 1
            time.sleep(0.2)

        images = _pngs(16)
        lock = threading.Lock()
        submit_ms: list[float] = []
        read_ms: list[float] = []
        ids: list[str] = []
        counts = {"submitted": 0, "queue_full": 0, "errors": 0, "reads": 0}
        stop_at = time.monotonic() + args.duration

        def submitter(n: int) -> None:
            session = requests.Session()
            i = n
            while time.monotonic() < stop_at:
                image = images[i % len(images)]
                i += args.submitters
                t = time.perf_counter()
                try:
                    r = session.post(f"{url}/v1/analyses", files={"image": ("cell.png", image, "image/png")}, timeout=60)
                except requests.RequestException:
                    with lock:
                        counts["errors"] += 1
                    continue
                elapsed = (time.perf_counter() - t) * 1000
                with lock:
                    if r.status_code == 202:
                        submit_ms.append(elapsed)
                        counts["submitted"] += 1
                        ids.append(r.json()["id"])
                    elif r.status_code == 503:
                        counts["queue_full"] += 1
                    else:
                        counts["errors"] += 1
                if r.status_code == 503:
                    time.sleep(min(float(r.headers.get("Retry-After", 1)), 1.0))

        def reader() -> None:
            session = requests.Session()
            while time.monotonic() < stop_at:
                with lock:
                    target = ids[-1] if ids else None
                path = f"/v1/analyses/{target}" if target and counts["reads"] % 2 else "/v1/analyses?limit=20"
                t = time.perf_counter()
                try:
                    r = session.get(url + path, timeout=60)
                    ok = r.status_code == 200
                except requests.RequestException:
                    ok = False
                with lock:
                    counts["reads"] += 1
                    if ok:
                        read_ms.append((time.perf_counter() - t) * 1000)
                    else:
                        counts["errors"] += 1
                time.sleep(0.05)

        started = time.monotonic()
        threads = [threading.Thread(target=submitter, args=(n,)) for n in range(args.submitters)]
        threads += [threading.Thread(target=reader) for _ in range(args.readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_end = time.monotonic()
        counts_during = requests.get(f"{url}/v1/analyses?limit=1", timeout=30).json()["counts"]
        completed_during = counts_during.get("completed", 0) + counts_during.get("failed", 0)
        # drain: everything accepted must finish
        drain_deadline = time.monotonic() + 600
        while True:
            c = requests.get(f"{url}/v1/analyses?limit=1", timeout=30).json()["counts"]
            if not c.get("queued") and not c.get("running"):
                break
            if time.monotonic() > drain_deadline:
                print("queue did not drain", file=sys.stderr)
                break
            time.sleep(0.5)
        drained = time.monotonic()
        memory = _rss_kib(server.pid)
        total = counts["submitted"] + counts["queue_full"] + counts["errors"] + counts["reads"]
        print(f"service_load: {args.duration:.0f} s of load, {args.submitters} submitters + "
              f"{args.readers} readers, server on cores {args.cores} with {args.workers} workers")
        print(f"  analyses accepted        {counts['submitted']}")
        print(f"  analyses finished        {c.get('completed', 0)} completed, {c.get('failed', 0)} failed "
              f"(all accepted finished: {c.get('completed', 0) + c.get('failed', 0) == counts['submitted']})")
        print(f"  sustained throughput     {completed_during / (load_end - started):.2f} analyses/s during load; "
              f"{(c.get('completed', 0) + c.get('failed', 0)) / (drained - started):.2f} analyses/s to drain")
        print(f"  submit latency (202)     p50 {_percentile(submit_ms, .5):.1f} ms, p99 {_percentile(submit_ms, .99):.1f} ms")
        print(f"  read latency (GET)       p50 {_percentile(read_ms, .5):.1f} ms, p99 {_percentile(read_ms, .99):.1f} ms "
              f"({len(read_ms)} reads, mean {statistics.fmean(read_ms) if read_ms else float('nan'):.1f} ms)")
        print(f"  back-pressure (503)      {counts['queue_full']}")
        print(f"  errors                   {counts['errors']} of {total} requests "
              f"({100.0 * counts['errors'] / max(total, 1):.2f} %)")
        print(f"  server memory            RSS {memory.get('VmRSS', 0) / 1024:.0f} MiB, "
              f"peak {memory.get('VmHWM', 0) / 1024:.0f} MiB")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
