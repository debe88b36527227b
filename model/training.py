"""Fit the whole pipeline on decoded images: CNN, then the HOSVD head and the SVM baseline.

The three heads share the CNN of a run: ``hosvd`` (the method), ``softmax`` (the CNN's own
linear head) and ``svm`` (a linear SVM on globally pooled feature maps), so a report compares
like with like. Where classes hold labelled sub-classes (kinds of cell), every head is trained
on the kinds and answers with classes: the HOSVD head gives each kind a subspace, the softmax
head sums its kinds' probabilities, the SVM takes its best kind's score.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from leuk_fhir.model.checkpoint import TrainingCheckpoint
from leuk_fhir.model.cnn import (
    AUGMENTATIONS,
    CellCNN,
    CNNConfig,
    TrainingHistory,
    calibrate_stage_scales,
    extract,
    resolve_device,
    train_cnn,
)
from leuk_fhir.model.dataset import Subclasses
from leuk_fhir.model.hosvd import HOSVDClassifier
from leuk_fhir.model.images import focus_floor, focus_scores

log = logging.getLogger(__name__)

HEADS = ("hosvd", "softmax", "svm")
#: Auto epochs aim at this many optimiser steps, within [MIN_EPOCHS, MAX_EPOCHS]: 40 epochs
#: for a 3,200-image training fold, 12 for 10,000+ images, 200 for a 260-image set.
TARGET_STEPS = 2000
MIN_EPOCHS = 12
MAX_EPOCHS = 200


def resolve_epochs(epochs: int, n_images: int, batch_size: int) -> int:
    """Epochs to train: ``epochs`` when given, else auto (see :class:`TrainingConfig`)."""
    if epochs > 0:
        return epochs
    steps_per_epoch = max(1, -(-n_images // batch_size))
    return min(MAX_EPOCHS, max(MIN_EPOCHS, -(-TARGET_STEPS // steps_per_epoch)))


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that defines a training run (stored in the model artifact)."""

    image_size: int = 64
    #: central fraction of each (squared) image kept before resizing: the dataset's framing
    #: (:mod:`leuk_fhir.model.framing`), stored in the model file and applied to every image
    #: it classifies; set from the dataset by ``cross_validate`` and ``train_and_save``
    crop: float = 1.0
    #: 0 = auto: about ``TARGET_STEPS`` optimiser steps (more epochs for small datasets, fewer
    #: for large ones; 40 for a PBC training fold), see :func:`resolve_epochs`.
    epochs: int = 0
    batch_size: int = 64
    learning_rate: float = 4e-3
    #: AdamW's decoupled weight decay. 0.05 was +0.2 points on PBC 8 classes on a GPU but
    #: -0.1 in the 2-core CPU run, within the noise both ways, so 5e-4 stays
    #: (docs/model-measurements.md)
    weight_decay: float = 5e-4
    widths: tuple[int, ...] = (16, 32, 64, 128)
    stage_depths: tuple[int, ...] = (1, 2, 2, 2)
    feature_grid: int = 4
    #: the last N stages' maps feed the heads (stacked channels; docs/model.md)
    feature_stages: int = 1
    seed: int = 0
    device: str = "auto"
    #: training arithmetic: auto (bfloat16 where the hardware has native support), bf16, fp32
    precision: str = "auto"
    hosvd_cv: int = 3
    #: average feature maps and softmax output over the 8 dihedral transforms of each crop:
    #: +0.1 (HOSVD) to +0.3 (softmax) points on framed PBC 8 classes (5-fold, docs/model.md)
    #: for 8x the inference cost, so off by default (the 300 cells/s inference goal);
    #: `--dihedral-average` turns it on.
    dihedral_average: bool = False
    #: training augmentation recipe, a key of :data:`leuk_fhir.model.cnn.AUGMENTATIONS`
    augmentation: str = "standard"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["stage_depths"] = list(self.stage_depths)
        return d


@dataclass
class HeadOutput:
    """Predicted class index and per-class scores (probabilities, or SVM decision values)."""

    predicted: np.ndarray
    scores: np.ndarray


@dataclass
class FittedPipeline:
    class_names: tuple[str, ...]
    config: TrainingConfig
    mean: np.ndarray
    std: np.ndarray
    cnn: CellCNN
    hosvd: HOSVDClassifier
    svm: Any | None
    history: TrainingHistory
    seconds: dict[str, float] = field(default_factory=dict)
    #: the kinds of cell the heads were trained on, when classes hold several
    subclasses: Subclasses | None = None
    #: crops less sharp than this are out of focus (:func:`~leuk_fhir.model.images.focus_floor`)
    focus_floor: float | None = None

    @property
    def device(self) -> torch.device:
        return next(self.cnn.parameters()).device

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feature maps and softmax-head probabilities of prepared (n, s, s, 3) uint8 images."""
        return extract(
            self.cnn,
            images,
            self.mean,
            self.std,
            self.device,
            dihedral=self.config.dihedral_average,
        )

    def out_of_focus(self, images: np.ndarray) -> np.ndarray:
        """True for prepared crops blurrier than the training crops (see ``focus_floor``)."""
        return focus_scores(images, self.focus_floor) > 1.0

    def predict_heads(self, images: np.ndarray) -> dict[str, HeadOutput]:
        """All three heads on prepared images."""
        return self.heads_from_features(*self.features(images))

    def heads_from_features(self, maps: np.ndarray, soft: np.ndarray) -> dict[str, HeadOutput]:
        """All three heads on :meth:`features` output (extract once, score every head)."""
        proba = self.hosvd.predict_proba(maps)
        out = {
            "hosvd": HeadOutput(proba.argmax(1), proba),
            "softmax": HeadOutput(soft.argmax(1), soft),
        }
        if self.svm is not None:
            decision = np.asarray(self.svm.decision_function(pooled(maps)))
            if decision.ndim == 1:
                decision = np.stack([-decision, decision], axis=1)
            if self.subclasses is not None:
                # columns follow the kinds the SVM saw in training
                parents = np.asarray(self.subclasses.parents)[np.asarray(self.svm.classes_)]
                decision = np.stack(
                    [decision[:, parents == c].max(axis=1) for c in range(len(self.class_names))],
                    axis=1,
                )
            out["svm"] = HeadOutput(decision.argmax(1), decision)
        return out


def pooled(maps: np.ndarray) -> np.ndarray:
    """Globally average-pooled feature maps (n, C), the SVM baseline's input."""
    return maps.reshape(maps.shape[0], maps.shape[1], -1).mean(axis=2)


def svm_baseline(seed: int) -> Any:
    """The linear SVM baseline (standardised inputs) fitted on :func:`pooled` maps."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return make_pipeline(StandardScaler(), LinearSVC(C=0.5, max_iter=5000, random_state=seed))


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] units of (n, H, W, 3) uint8 images."""
    sample = images[:: max(1, len(images) // 512)].reshape(-1, 3).astype(np.float64) / 255.0
    return sample.mean(axis=0).astype(np.float32), np.maximum(sample.std(axis=0), 1e-3).astype(
        np.float32
    )


def fit_pipeline(
    images: np.ndarray,
    y: np.ndarray,
    class_names: tuple[str, ...],
    config: TrainingConfig,
    with_svm: bool = True,
    progress: bool = False,
    description: str = "training CNN",
    on_epoch: Callable[[int, float, float], None] | None = None,
    subclasses: Subclasses | None = None,
    sub_y: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    checkpoint: TrainingCheckpoint | None = None,
) -> FittedPipeline:
    """Train the CNN, extract feature maps, fit the HOSVD head (and the SVM baseline).

    ``progress`` shows a bar of epochs; ``on_epoch(epoch, loss, accuracy)`` is called after each.
    With ``subclasses`` and ``sub_y`` (each image's kind) the heads learn the kinds and answer
    with classes. ``groups`` (each image's patient) keeps patients apart in the HOSVD head's
    inner cross-validation. ``checkpoint`` keeps the CNN's training state as it trains, and
    continues one an interrupted run of the same job left (:mod:`leuk_fhir.model.checkpoint`).
    """
    if (subclasses is None) != (sub_y is None):
        raise ValueError("give both subclasses and sub_y, or neither")
    if config.augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation must be one of {sorted(AUGMENTATIONS)}, not {config.augmentation!r}"
        )
    if (
        subclasses is not None
        and sub_y is not None
        and not np.array_equal(np.asarray(subclasses.parents)[sub_y], y)
    ):
        raise ValueError("sub_y does not agree with y: a kind outside its image's class")
    device = resolve_device(config.device)
    mean, std = channel_statistics(images)
    cnn_config = CNNConfig(
        n_classes=len(class_names),
        subclass_parents=() if subclasses is None else subclasses.parents,
        widths=config.widths,
        stage_depths=config.stage_depths,
        feature_grid=config.feature_grid,
        feature_stages=config.feature_stages,
    )
    epochs = resolve_epochs(config.epochs, len(images), config.batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        kept = None if checkpoint is None else checkpoint.load(epochs)[0]
        done = 0 if kept is None else int(kept["epoch"])  # epochs a stopped run kept
        bar = tqdm(total=epochs, initial=done, desc=description, unit="epoch", leave=False)

    def callback(epoch: int, loss: float, accuracy: float) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")
            bar.update(1)
        if on_epoch is not None:
            on_epoch(epoch, loss, accuracy)

    cnn, history = train_cnn(
        images,
        y if sub_y is None else sub_y,
        cnn_config,
        mean,
        std,
        epochs,
        config.seed,
        device,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        progress=callback,
        precision=config.precision,
        augmentation=AUGMENTATIONS[config.augmentation],
        checkpoint=checkpoint,
    )
    if bar is not None:
        bar.close()
    t0 = time.perf_counter()
    maps, _ = extract(cnn, images, mean, std, device, dihedral=config.dihedral_average)
    maps = calibrate_stage_scales(cnn, maps)
    t1 = time.perf_counter()
    hosvd = HOSVDClassifier(cv=config.hosvd_cv, random_state=config.seed).fit(
        maps, y, subclasses=sub_y, groups=groups
    )
    t2 = time.perf_counter()
    svm = None
    if with_svm:
        svm = svm_baseline(config.seed)
        svm.fit(pooled(maps), y if sub_y is None else sub_y)
    t3 = time.perf_counter()
    log.info(
        "HOSVD: ranks (%d, %d), %d basis images, %d sub-classes, inner-CV accuracy %.4f",
        hosvd.channel_rank_,
        hosvd.position_rank_,
        hosvd.n_basis_,
        hosvd.n_subspaces_,
        hosvd.cv_accuracy_,
    )
    return FittedPipeline(
        class_names=class_names,
        config=config,
        mean=mean,
        std=std,
        cnn=cnn,
        hosvd=hosvd,
        svm=svm,
        history=history,
        seconds={"cnn": history.seconds, "extract": t1 - t0, "hosvd": t2 - t1, "svm": t3 - t2},
        subclasses=subclasses,
        focus_floor=focus_floor(images),
    )
