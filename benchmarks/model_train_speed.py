"""CNN training speed on this machine, and what it means for a 5-fold PBC evaluation.

Runs the real training loop (`train_cnn`: augmentation, autocast, AdamW, one-cycle) on random
64 px crops for a few epochs in each precision, and prints milliseconds per batch of 64, crops
per second and the CNN minutes a PBC-sized job would take (5 folds x 3,200 training crops at
the auto epochs; the HOSVD fits and feature extraction add 1-3 minutes). Answers "how long will
`leuk-fhir evaluate` take here?" in a minute instead of an hour.

Usage: nice -n 10 .venv/bin/python benchmarks/model_train_speed.py [--precisions auto,fp32,bf16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from leuk_fhir.model.cnn import CNNConfig, resolve_device, resolve_precision, train_cnn
from leuk_fhir.model.machine import describe_machine, machine_text
from leuk_fhir.model.training import TrainingConfig, resolve_epochs

PBC_TRAIN_CROPS = 3_200
PBC_FOLDS = 5


def seconds_per_step(precision: str, epochs: int, crops: int, batch: int, device: str) -> float:
    """Median seconds per optimiser step over the epochs after the first (warm-up)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(crops, 64, 64, 3), dtype=np.uint8)
    y = np.arange(crops) % 8
    stamps: list[float] = []
    start = time.perf_counter()
    train_cnn(
        images,
        y,
        CNNConfig(n_classes=8),
        np.full(3, 0.5, np.float32),
        np.full(3, 0.25, np.float32),
        epochs,
        seed=0,
        device=resolve_device(device),
        batch_size=batch,
        precision=precision,
        progress=lambda *_: stamps.append(time.perf_counter()),
    )
    per_epoch = np.diff([start, *stamps])[1:]
    return float(np.median(per_epoch)) / -(-crops // batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="auto,fp32", help="comma-separated")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs (first is warm-up)")
    parser.add_argument("--crops", type=int, default=640, help="crops per epoch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    batch = TrainingConfig().batch_size
    pbc_epochs = resolve_epochs(0, PBC_TRAIN_CROPS, batch)
    pbc_steps = PBC_FOLDS * pbc_epochs * -(-PBC_TRAIN_CROPS // batch)
    print(f"machine: {machine_text(describe_machine(device))}")
    print(
        f"PBC 5-fold evaluation: {pbc_steps:,} optimiser steps "
        f"({PBC_FOLDS} folds x {pbc_epochs} epochs x {PBC_TRAIN_CROPS:,} crops / {batch})"
    )
    for precision in args.precisions.split(","):
        dtype = str(resolve_precision(precision, device)).removeprefix("torch.")
        step = seconds_per_step(precision, args.epochs, args.crops, batch, args.device)
        print(
            f"{precision:>5} ({dtype:8}): {1000 * step:6.1f} ms per batch of {batch}, "
            f"{batch / step:6.0f} crops/s; PBC 5-fold CNN training about "
            f"{pbc_steps * step / 60:5.1f} min"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
