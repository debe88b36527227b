"""`leuk-fhir evaluate` with default arguments on a small two-class set of 257x257 crops.

Stands in for an ALL-IDB2-sized job (about 260 images, 2 classes, 257x257 px): it takes
``--per-class`` PBC lymphocytes and monocytes (two mononuclear cell types), centre-crops them
to 257x257, writes them as class folders, and times the default 5-fold evaluation.

Usage: nice -n 10 .venv/bin/python benchmarks/model_small_eval.py [--per-class 150] [EVALUATE ARGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

from leuk_fhir.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
PBC = REPO.parent / "shared" / "datasets" / "pbc"
RESULTS = REPO / "benchmarks" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--classes", nargs=2, default=["lymphocyte", "monocyte"])
    args, extra = parser.parse_known_args()
    data = RESULTS / f"small-eval-data-{args.per_class}"
    rng = np.random.default_rng(0)
    for name in args.classes:
        target = data / name
        if target.exists():
            continue
        target.mkdir(parents=True)
        files = sorted((PBC / name).glob("*.jpg"))
        for i in rng.permutation(len(files))[: args.per_class]:
            image = Image.open(files[i]).convert("RGB")
            left, top = (image.width - 257) // 2, (image.height - 257) // 2
            image.crop((left, top, left + 257, top + 257)).save(target / f"{files[i].stem}.png")
    out = RESULTS / ("small-eval" + ("-" + "-".join(a.strip("-") for a in extra) if extra else ""))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    code = cli_main(["evaluate", str(data), "--out", str(out), *extra])
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if code:
        return code
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    report = json.loads((out / "report.json").read_text())
    print(
        f"\n== {report['images']} images of 257x257 px, {report['folds']} folds, epochs per fold {sorted({f['epochs'] for f in report['per_fold']})}"
    )
    for head, s in report["heads"].items():
        print(
            f"{head:8s} accuracy {100 * s['accuracy_mean']:6.2f}% +- {100 * s['accuracy_std']:.2f}"
        )
    print(
        f"wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min, load average now {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
