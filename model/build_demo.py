"""Build the bundled demo model from the synthetic generator (NOT for clinical use).

Usage: ``python -m leuk_fhir.model.build_demo [--per-class N] [--epochs N]`` writes
``leuk_fhir/data/demo-model.lfm`` (and ``docs/model-card.md`` when run from a checkout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from leuk_fhir.model.training import TrainingConfig
from leuk_fhir.model.workflow import synthetic_dataset, train_and_save

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "leuk_fhir" / "data" / "demo-model.lfm"


def ood_rates(path: Path, seed: int = 1) -> dict[str, float]:
    """Share of obviously non-cell inputs the model calls indeterminate."""
    from scipy import ndimage

    from leuk_fhir.model.classifier import load_classifier
    from leuk_fhir.model.synthetic import generate_cell

    clf = load_classifier(path)
    rng = np.random.default_rng(seed)
    n = 40
    sets = {
        "noise": [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(n)],
        "flat colour": [
            np.full((128, 128, 3), rng.integers(0, 256, 3), dtype=np.uint8) for _ in range(n)
        ],
        "blurred cell": [
            ndimage.gaussian_filter(generate_cell(("blast", "normal")[i % 2], rng), (6, 6, 0))
            for i in range(n)
        ],
        "wrong stain": [
            generate_cell(("blast", "normal")[i % 2], rng)[:, :, ::-1].copy() for i in range(n)
        ],
        "held-out synthetic cells": [
            generate_cell(("blast", "normal")[i % 2], rng) for i in range(n)
        ],
    }
    return {k: float(np.mean([f.indeterminate for f in clf.classify(v)])) for k, v in sets.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--folds",
        type=int,
        default=3,
        help="cross-validation folds for the stored metrics (0: none)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--card", type=Path, default=REPO / "docs" / "model-card.md")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = TrainingConfig(epochs=args.epochs, seed=0)
    dataset = synthetic_dataset(args.per_class, seed=0, image_size=config.image_size)
    _, sha, report = train_and_save(
        dataset,
        args.out,
        config,
        name="leuk-fhir-demo",
        version="0.2.0-demo",
        is_demo=True,
        cv_folds=args.folds,
        progress=True,
        description="DEMO ONLY: trained on synthetic lymphoblast-like and lymphocyte-like cells.",
    )
    rates = ood_rates(args.out)
    from leuk_fhir.model.workflow import _amend_manifest

    _amend_manifest(args.out, {"ood": rates})
    from leuk_fhir.model.classifier import load_classifier

    info = load_classifier(args.out).info
    if args.card:
        args.card.parent.mkdir(parents=True, exist_ok=True)
        args.card.write_text(info.model_card_markdown or "", encoding="utf-8")
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB, sha256 {info.sha256})")
    if report:
        print({h: round(s["accuracy_mean"], 4) for h, s in report["heads"].items()})
    print("indeterminate rates:", rates)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
