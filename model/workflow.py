"""End-to-end model workflows behind the CLI: train (optionally cross-validated) and save."""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from leuk_fhir.model.dataset import CellDataset
from leuk_fhir.model.evaluation import (
    cross_validate,
    evaluation_summary,
    final_fit_checkpoint,
    flat_metrics,
)
from leuk_fhir.model.fold_store import clear_folds
from leuk_fhir.model.machine import describe_machine
from leuk_fhir.model.training import (
    FittedPipeline,
    TrainingConfig,
    fit_pipeline,
    resolve_epochs,
)

log = logging.getLogger(__name__)


def synthetic_dataset(
    per_class: int, seed: int, image_size: int, cell_size: int = 128
) -> CellDataset:
    """An in-memory dataset from the synthetic generator (fixture and demo-model data)."""
    from leuk_fhir.model.images import prepare_batch
    from leuk_fhir.model.synthetic import CELL_KINDS, generate_cell

    rng = np.random.default_rng(seed)
    cells = [generate_cell(kind, rng, cell_size) for kind in CELL_KINDS for _ in range(per_class)]
    labels = np.repeat(np.array(CELL_KINDS), per_class)
    digest = hashlib.sha256(f"synthetic:{per_class}:{seed}:{cell_size}".encode()).hexdigest()
    return CellDataset(
        images=prepare_batch(cells, image_size),
        labels=labels,
        class_names=tuple(sorted(CELL_KINDS)),
        groups=None,
        paths=tuple(f"synthetic/{label}/{i}" for i, label in enumerate(labels)),
        fingerprint=digest,
        source=f"leuk_fhir.model.synthetic (seed {seed}, {per_class} cells per class, {cell_size} px)",
    )


def train_and_save(
    dataset: CellDataset,
    out: Path,
    config: TrainingConfig,
    *,
    name: str = "leuk-fhir-cnn-hosvd",
    version: str = "0.1.0",
    is_demo: bool = False,
    cv_folds: int = 0,
    cv_workers: int = 0,
    keep: Path | None = None,
    progress: bool = False,
    description: str = "",
    extra_manifest: dict[str, Any] | None = None,
) -> tuple[FittedPipeline, str, dict[str, Any] | None]:
    """Optionally cross-validate, then fit on all data and write the model file.

    ``keep``: a folder where finished folds and the CNNs' training states are kept until the
    file is written, so that an interrupted run continues (:mod:`leuk_fhir.model.fold_store`,
    :mod:`leuk_fhir.model.checkpoint`). Returns the fitted pipeline,
    the file's SHA-256 and the cross-validation report (or None).
    """
    from leuk_fhir.model.classifier import save_pipeline

    config = replace(config, crop=dataset.framing.crop)
    report = None
    metrics: dict[str, float] = {}
    if cv_folds:
        report = cross_validate(
            dataset, cv_folds, config, progress=progress, workers=cv_workers, keep=keep
        )
        metrics = flat_metrics(report)
    checkpoint = None if keep is None else final_fit_checkpoint(keep, dataset, config)
    if checkpoint is not None and progress:
        epochs = resolve_epochs(config.epochs, len(dataset.images), config.batch_size)
        note = checkpoint.resume_note(epochs, "the CNN trained on all images")[1]
        if note:
            print(note, file=sys.stderr)
    pipeline = fit_pipeline(
        dataset.images,
        dataset.y,
        dataset.class_names,
        config,
        with_svm=False,
        progress=progress,
        subclasses=dataset.subclasses,
        sub_y=dataset.sub_y,
        groups=dataset.groups,
        checkpoint=checkpoint,
    )
    metrics["train_images"] = float(len(dataset.labels))
    metrics["hosvd_inner_cv_accuracy"] = float(pipeline.hosvd.cv_accuracy_)
    metrics["cnn_final_train_accuracy"] = (
        float(pipeline.history.train_accuracy[-1]) if pipeline.history.train_accuracy else 0.0
    )
    training = {
        "data": dataset.summary(),
        "config": config.to_json(),
        "history": {
            "epochs": pipeline.history.epochs,
            "train_loss": list(pipeline.history.train_loss),
            "train_accuracy": list(pipeline.history.train_accuracy),
            "seconds": pipeline.history.seconds,
            "precision": pipeline.history.precision,
        },
        "machine": describe_machine(pipeline.device),
    }
    sha = save_pipeline(
        out,
        pipeline,
        name=name,
        version=version,
        is_demo=is_demo,
        training=training,
        metrics=metrics,
        evaluation=evaluation_summary(report) if report else None,
        description=description,
    )
    if extra_manifest:
        _amend_manifest(out, extra_manifest)
        sha = hashlib.sha256(Path(out).read_bytes()).hexdigest()
    if keep is not None:
        clear_folds(keep)
    return pipeline, sha, report


def _amend_manifest(path: Path, extra: dict[str, Any]) -> None:
    """Add top-level keys to a written model file's manifest (rewrites the file)."""
    from leuk_fhir.model.artifact import read_artifact, write_artifact

    artifact = read_artifact(Path(path))
    manifest = {
        k: v
        for k, v in artifact.manifest.items()
        if k not in ("entries", "format", "format_version")
    }
    manifest.update(extra)
    write_artifact(Path(path), manifest, artifact.cnn_state, artifact.hosvd_arrays)
