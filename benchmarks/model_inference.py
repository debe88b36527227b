"""Inference speed on this CPU: cells/s batched and single-cell latency (p50 / p99).

Inputs are 360x360 RGB crops (the size of a PBC cell image), so resizing is included.
Usage: nice -n 10 .venv/bin/python benchmarks/model_inference.py [--model M] [--threads N]
(the model defaults to the bundled demo model, which has the default architecture).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from leuk_fhir.model import load_classifier
from leuk_fhir.model.synthetic import generate_cell


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--cells", type=int, default=1024)
    parser.add_argument(
        "--single", type=int, default=200, help="single-cell calls for the latency figures"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--size", type=int, default=360)
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="batched runs; the median and the best are printed (a shared host is noisy)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clf = load_classifier(args.model, device="cpu", batch_size=256)
    rng = np.random.default_rng(0)
    base = [generate_cell(("blast", "normal")[i % 2], rng, args.size) for i in range(64)]
    cells = [base[i % len(base)] for i in range(args.cells)]
    clf.classify(cells[:64])  # warm-up
    load = os.getloadavg()[0]
    rates, cpu_rates = [], []
    for _ in range(max(1, args.repeats)):
        start, cpu0 = time.perf_counter(), time.process_time()
        clf.classify(cells)
        rates.append(args.cells / (time.perf_counter() - start))
        cpu_rates.append(args.cells / (time.process_time() - cpu0))
    batched, best = float(np.median(rates)), max(rates)
    per_cpu_second = float(np.median(cpu_rates))
    latencies = []
    for i in range(args.single):
        t0 = time.perf_counter()
        clf.classify([base[i % len(base)]])
        latencies.append(1000 * (time.perf_counter() - t0))
    p50, p99 = np.percentile(latencies, [50, 99])
    print(
        f"model {clf.info.name} {clf.info.version} ({clf.image_size} px input), torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        f"batched: {batched:.0f} cells/s wall, median of {len(rates)} runs (best {best:.0f}; "
        f"{args.cells} cells of {args.size}x{args.size} px, resize included); "
        f"{per_cpu_second:.0f} cells per CPU-second (what an idle core gives; the machine may be shared)"
    )
    print(f"single cell latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({args.single} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
