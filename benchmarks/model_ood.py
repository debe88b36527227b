"""Out-of-distribution behaviour: share of non-cell inputs that come back `indeterminate`.

Trains (or loads) a model on a per-class subsample of the PBC single-cell images, then feeds
it: held-out PBC cells (in distribution: should rarely be indeterminate), whole BCCD smear
fields (640x480, fed as if single cells), uniform noise, flat colours, blurred PBC cells and
PBC cells with a wrong stain (colour channels swapped, or grayscale).

Usage: nice -n 10 .venv/bin/python benchmarks/model_ood.py [--model M] [--per-class N] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from leuk_fhir.model import load_classifier
from leuk_fhir.model.images import decode_image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "datasets"
RESULTS = REPO / "benchmarks" / "results"
LIMIT = 64_000_000


def _pbc_split(per_class: int, seed: int) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for folder in sorted(p for p in (SHARED / "pbc").iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.jpg"))
        order = rng.permutation(len(files))
        train += [(files[i], folder.name) for i in order[:per_class]]
        held_out += [(files[i], folder.name) for i in order[per_class : per_class + 25]]
    return train, held_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="use this model instead of training one"
    )
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--bccd", type=int, default=364, help="number of BCCD fields to feed")
    args = parser.parse_args()
    train, held_out = _pbc_split(args.per_class, seed=0)
    model = args.model
    if model is None:
        from leuk_fhir.cli import main as cli_main

        RESULTS.mkdir(parents=True, exist_ok=True)
        manifest = RESULTS / "ood-train.csv"
        manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in train))
        model = RESULTS / f"pbc-ood-{args.per_class}pc-e{args.epochs}.lfm"
        if not model.exists():
            t0 = time.perf_counter()
            assert (
                cli_main(
                    ["train", str(manifest), "--out", str(model), "--epochs", str(args.epochs)]
                )
                == 0
            )
            print(
                f"trained {model.name} on {len(train)} PBC cells in {time.perf_counter() - t0:.0f} s"
            )
    clf = load_classifier(model, device="cpu")
    rng = np.random.default_rng(1)
    cells = [decode_image(p, LIMIT) for p, _ in held_out]
    labels = [label for _, label in held_out]
    fields = sorted((SHARED / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))[: args.bccd]
    sets: dict[str, list[np.ndarray]] = {
        "held-out PBC cells (in distribution)": cells,
        "BCCD smear fields (640x480, whole)": [decode_image(p, LIMIT) for p in fields],
        "uniform noise": [rng.integers(0, 256, (360, 360, 3), dtype=np.uint8) for _ in range(100)],
        "flat colour": [
            np.full((360, 360, 3), rng.integers(0, 256, 3), dtype=np.uint8) for _ in range(100)
        ],
        "blurred PBC cells (sigma 8 px)": [
            ndimage.gaussian_filter(c, (8, 8, 0)) for c in cells[::2]
        ],
        "wrong stain (RGB -> BGR)": [np.ascontiguousarray(c[:, :, ::-1]) for c in cells[::2]],
        "wrong stain (R <-> G)": [np.ascontiguousarray(c[:, :, [1, 0, 2]]) for c in cells[::2]],
        "grayscale PBC cells": [
            np.repeat(c.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2) for c in cells[::2]
        ],
    }
    print(f"model {clf.info.name} ({model}), load average {os.getloadavg()[0]:.1f}")
    for name, images in sets.items():
        findings = clf.classify(images)
        rate = np.mean([f.indeterminate for f in findings])
        extra = ""
        if name.startswith("held-out"):
            kept = [
                (f.label, t) for f, t in zip(findings, labels, strict=True) if not f.indeterminate
            ]
            extra = f"; accuracy of the rest {100 * np.mean([a == b for a, b in kept]):.1f}%"
        print(f"{name:42s} {len(images):4d} images: {100 * rate:5.1f}% indeterminate{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
