"""One split of PBC, any CNN shape: the quick comparison behind the architecture table.

The table is under "Architecture search" in docs/model-measurements.md.

Trains the library's CNN + heads (``fit_pipeline``) on folds 2-5 of the deterministic 5-fold
split and scores the three heads on fold 1 (``--fold``), printing accuracy and timings. One
800-cell test fold carries about +-0.7 points of noise: use it to find large effects, then
confirm with ``model_pbc_cv.py``.

Usage:
    nice -n 10 .venv/bin/python benchmarks/model_one_fold.py --widths 16,32,64,128 \\
        --depths 1,2,2,2 --image-size 64 --epochs 40 [--crop 1] [--precision fp32] [--binary]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from leuk_fhir.model.dataset import load_dataset, stratified_folds
from leuk_fhir.model.framing import parse_crop
from leuk_fhir.model.training import TrainingConfig, fit_pipeline

REPO = Path(__file__).resolve().parent.parent
PBC = REPO.parent / "shared" / "datasets" / "pbc"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=PBC)
    parser.add_argument("--widths", type=_ints, default=TrainingConfig.widths)
    parser.add_argument("--depths", type=_ints, default=TrainingConfig.stage_depths)
    parser.add_argument("--image-size", type=int, default=TrainingConfig.image_size)
    parser.add_argument("--epochs", type=int, default=0, help="0: auto")
    parser.add_argument(
        "--crop",
        type=parse_crop,
        default=None,
        help="central fraction kept (default auto, as evaluate; 1 = the whole image, as in the "
        "architecture table, which predates framing)",
    )
    parser.add_argument(
        "--feature-stages", type=int, default=1, help="last N stages' maps feed the heads"
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--fold", type=int, default=1, help="test fold, 1-5")
    parser.add_argument("--binary", action="store_true", help="lymphocyte vs the rest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-subclasses",
        action="store_true",
        help="with --binary: train on the two classes only, not the cell types inside 'other'",
    )
    args = parser.parse_args()
    data = load_dataset(
        args.data,
        args.image_size,
        max_pixels=64_000_000,
        binary_positive="lymphocyte" if args.binary else None,
        crop=args.crop,
        subclasses=not args.no_subclasses,
    )
    train, test = stratified_folds(data.labels, 5, seed=args.seed)[args.fold - 1]
    config = TrainingConfig(
        image_size=args.image_size,
        epochs=args.epochs,
        widths=args.widths,
        stage_depths=args.depths,
        precision=args.precision,
        seed=args.seed,
        feature_stages=args.feature_stages,
        crop=data.framing.crop,
    )
    start = time.perf_counter()
    pipeline = fit_pipeline(
        data.images[train],
        data.y[train],
        data.class_names,
        config,
        subclasses=data.subclasses,
        sub_y=None if data.sub_y is None else data.sub_y[train],
    )
    heads = pipeline.predict_heads(data.images[test])
    accuracy = {h: float(np.mean(out.predicted == data.y[test])) for h, out in heads.items()}
    result = {
        "widths": list(args.widths),
        "stage_depths": list(args.depths),
        "feature_stages": args.feature_stages,
        "image_size": args.image_size,
        "crop": data.framing.crop,
        "epochs": pipeline.history.epochs,
        "precision": pipeline.history.precision,
        "fold": args.fold,
        "binary": args.binary,
        "subclasses": data.subclasses is not None,
        "accuracy": accuracy,
        "seconds": {k: round(v, 1) for k, v in pipeline.seconds.items()},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
