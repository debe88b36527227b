"""5-fold evaluation of the three heads on the PBC single-cell set, with wall and CPU time.

Runs exactly the CLI (`leuk-fhir evaluate ../shared/datasets/pbc --folds 5 --out DIR`) in
this process and prints accuracy per head, wall time, CPU time and the load average (the
machine may be shared: CPU time / wall time / 2 cores shows how much of it we got).

Usage:
    nice -n 10 .venv/bin/python benchmarks/model_pbc_cv.py            # 8 classes
    nice -n 10 .venv/bin/python benchmarks/model_pbc_cv.py --binary   # lymphocyte vs rest
Extra arguments (e.g. --epochs 20 --image-size 96) go to `leuk-fhir evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from leuk_fhir.cli import main as cli_main
from leuk_fhir.model.machine import machine_text

REPO = Path(__file__).resolve().parent.parent
PBC = REPO.parent / "shared" / "datasets" / "pbc"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the fold workers)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", action="store_true", help="lymphocyte vs the rest")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=PBC)
    parser.add_argument("--out", type=Path, default=None)
    args, extra = parser.parse_known_args()
    name = "pbc-lymphocyte-vs-rest" if args.binary else "pbc-8class"
    if extra:
        name += "-" + "-".join(a.strip("-") for a in extra)
    out = args.out or REPO / "benchmarks" / "results" / name
    # --fresh: a timing trains every fold (no folds kept from an interrupted earlier run)
    argv = ["evaluate", str(args.data), "--folds", str(args.folds), "--out", str(out), "--fresh"]
    argv += extra
    if args.binary:
        argv += ["--binary-positive", "lymphocyte"]
    load_before = os.getloadavg()
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    code = cli_main(argv)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu0
    if code != 0:
        return code
    report = json.loads((out / "report.json").read_text())
    print(f"\n== {name}: {report['images']} images, {args.folds} folds")
    for head, s in report["heads"].items():
        print(
            f"{head:8s} accuracy {100 * s['accuracy_mean']:6.2f}% +- {100 * s['accuracy_std']:.2f}  "
            f"macro-F1 {100 * (s['macro_f1_mean'] or 0):.2f}%  macro-AUC {100 * (s['macro_auc_mean'] or 0):.2f}%"
        )
    print(
        f"HOSVD indeterminate on held-out in-distribution cells: {100 * report['indeterminate_rate_mean']:.2f}%"
    )
    sel = [f["hosvd_selection"] for f in report["per_fold"]]
    print(
        "HOSVD selections per fold:",
        [(s["channel_rank"], s["position_rank"], s["n_basis"], s["n_subspaces"]) for s in sel],
    )
    precisions = sorted({f["precision"] for f in report["per_fold"]})
    print(
        f"machine: {machine_text(report.get('machine'))}; CNNs trained in {', '.join(precisions)}"
    )
    plan = report.get("parallel", {})
    print(
        f"folds at a time: {plan.get('workers', 1)}, threads each: {plan.get('threads') or 'all'}"
    )
    print(
        f"wall time {wall / 60:.1f} min; CPU time {cpu / 60:.1f} min "
        f"({100 * cpu / wall / (os.cpu_count() or 1):.0f}% of {os.cpu_count()} cores); "
        f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    summary = {
        "name": name,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "machine": report.get("machine"),
        "heads": {
            h: {"accuracy_mean": s["accuracy_mean"], "accuracy_std": s["accuracy_std"]}
            for h, s in report["heads"].items()
        },
    }
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
