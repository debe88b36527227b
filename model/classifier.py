"""The classify stage: a loaded model turns RGB cell crops into :class:`CellFinding` records.

``load_classifier()`` reads a model file once (the bundled demo model by default) and returns a
thread-safe :class:`CellClassifier`. Each crop is squared, resized, passed through the CNN, and
its feature maps go to the HOSVD head: the label is the class with the smallest relative
residual, unless the residual to every class is above that class's threshold, in which case
the finding is :data:`~leuk_fhir.findings.INDETERMINATE` (not a blood cell like the training
cells: wrong stain, blurred, a whole field...).
"""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leuk_fhir.errors import ModelArtifactError
from leuk_fhir.findings import INDETERMINATE, CellClass, CellFinding, ModelInfo
from leuk_fhir.model.artifact import (
    ModelArtifact,
    class_records,
    read_artifact,
    stage_depths_of,
    write_artifact,
)
from leuk_fhir.model.classes import cell_class_for
from leuk_fhir.model.cnn import CellCNN, CNNConfig, extract, fuse_batch_norm, resolve_device
from leuk_fhir.model.hosvd import HOSVDClassifier, feature_norms
from leuk_fhir.model.images import focus_scores, prepare_batch
from leuk_fhir.model.training import FittedPipeline

DEMO_MODEL_RESOURCE = "demo-model.lfm"


@dataclass(frozen=True)
class ClassificationBatch:
    """Raw outputs for a batch, for evaluation and benchmarks."""

    probabilities: np.ndarray
    residuals: np.ndarray
    #: above 1: indeterminate (the larger of the HOSVD head's score and ``focus_scores``)
    ood_scores: np.ndarray
    softmax: np.ndarray
    #: the model's focus floor over each crop's sharpness: above 1, out of focus
    focus_scores: np.ndarray


class CellClassifier:
    """A loaded CNN + HOSVD model. Thread-safe; load once and share."""

    def __init__(self, artifact: ModelArtifact, device: str = "auto", batch_size: int = 64) -> None:
        manifest = artifact.manifest
        self.artifact = artifact
        self.batch_size = batch_size
        self.device = resolve_device(device)
        try:
            prep = manifest["preprocessing"]
            self.image_size = int(prep["image_size"])
            # Older model files predate framing: the whole image.
            self.crop = float(prep.get("crop", 1.0))
            if not 0.0 < self.crop <= 1.0:
                raise ValueError(f"preprocessing.crop must be in (0, 1], not {self.crop}")
            self.mean = np.asarray(prep["mean"], dtype=np.float32)
            self.std = np.asarray(prep["std"], dtype=np.float32)
            # Older model files predate the dihedral average: read as False.
            self.dihedral_average = bool(prep.get("dihedral_average", False))
            # ... and the focus check: no floor, nothing is out of focus.
            floor = prep.get("focus_floor")
            self.focus_floor = None if floor is None else float(floor)
            arch = manifest["cnn"]
            config = CNNConfig(
                n_classes=int(arch["n_classes"]),
                widths=tuple(arch["widths"]),
                stage_depths=stage_depths_of(arch),
                feature_grid=int(arch["feature_grid"]),
                # Older model files predate stacked stages: the last stage's maps only.
                feature_stages=int(arch.get("feature_stages", 1)),
                # ... and sub-classes: one head output per class.
                subclass_parents=tuple(int(c) for c in arch.get("subclass_parents", ())),
            )
            self.cnn = CellCNN(config)
            state = {k: torch.from_numpy(np.array(v)) for k, v in artifact.cnn_state.items()}
            self.cnn.load_state_dict(state, strict=True)
            self.cnn.to(self.device).to(memory_format=torch.channels_last).eval()
            # batch norms folded into the convolutions once, not on every call
            self.cnn = fuse_batch_norm(self.cnn)
            self.hosvd = HOSVDClassifier.from_state(manifest["hosvd"], artifact.hosvd_arrays)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelArtifactError(
                f"model file does not match this leuk-fhir's model architecture: {exc}"
            ) from exc
        self.class_names = tuple(c.name for c in artifact.classes)
        if len(self.hosvd.classes_) != len(self.class_names) or self.cnn.config.n_classes != len(
            self.class_names
        ):
            raise ModelArtifactError(
                "model file is inconsistent: class list differs from the HOSVD classes"
            )
        self._lock = threading.Lock()
        from leuk_fhir.model.model_card import render_model_card

        self.info = ModelInfo(
            name=str(manifest["name"]),
            version=str(manifest["version"]),
            sha256=artifact.sha256,
            classes=artifact.classes,
            is_demo=bool(manifest.get("is_demo", False)),
            metrics={k: float(v) for k, v in manifest.get("metrics", {}).items()},
            model_card_markdown=render_model_card(manifest, artifact.sha256),
        )

    def run(self, images: Sequence[np.ndarray]) -> ClassificationBatch:
        """Probabilities, residuals, OOD scores and softmax-head output for RGB crops."""
        return self.run_prepared(prepare_batch(images, self.image_size, self.crop))

    def run_prepared(self, batch: np.ndarray) -> ClassificationBatch:
        """:meth:`run` on crops already framed and resized as this model prepares them
        ((n, image_size, image_size, 3) uint8, as ``load_dataset`` makes them with the model's
        ``image_size`` and ``crop``)."""
        if batch.ndim != 4 or batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"prepared crops must be (n, {self.image_size}, {self.image_size}, 3), "
                f"not {batch.shape}"
            )
        with self._lock, torch.inference_mode():
            maps, soft = extract(
                self.cnn,
                batch,
                self.mean,
                self.std,
                self.device,
                batch_size=self.batch_size,
                dihedral=self.dihedral_average,
            )
        residuals = self.hosvd.residuals(maps)
        focus = focus_scores(batch, self.focus_floor)
        hosvd_scores = self.hosvd.out_of_distribution_scores(residuals, feature_norms(maps))
        return ClassificationBatch(
            probabilities=self.hosvd.predict_proba(maps)
            if len(maps)
            else np.zeros((0, len(self.class_names))),
            residuals=residuals,
            ood_scores=np.maximum(hosvd_scores, focus),
            softmax=soft,
            focus_scores=focus,
        )

    def classify(self, images: Sequence[np.ndarray]) -> list[CellFinding]:
        """One :class:`CellFinding` per RGB uint8 (H, W, 3) crop, in order (box left None)."""
        if len(images) == 0:
            return []
        out = self.run(images)
        findings: list[CellFinding] = []
        rows = zip(out.probabilities, out.residuals, out.ood_scores, out.focus_scores, strict=True)
        for probs, res, score, focus in rows:
            probabilities = {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}
            residuals = {c: float(r) for c, r in zip(self.class_names, res, strict=True)}
            if score > 1.0:
                reason = (
                    "out of focus or featureless: less fine detail than the cells the model "
                    f"was trained on (focus score {focus:.2f} > 1)"
                    if focus > 1.0
                    else "out of distribution: too far from every class subspace, or feature "
                    f"energy outside the training range (score {score:.2f} > 1)"
                )
                findings.append(
                    CellFinding(
                        label=INDETERMINATE,
                        probabilities=probabilities,
                        residuals=residuals,
                        indeterminate_reason=reason,
                    )
                )
            else:
                label = self.class_names[int(np.argmin(res))]
                findings.append(
                    CellFinding(label=label, probabilities=probabilities, residuals=residuals)
                )
        return findings


def _demo_model_bytes() -> bytes:
    resource = importlib.resources.files("leuk_fhir").joinpath("data", DEMO_MODEL_RESOURCE)
    try:
        return resource.read_bytes()
    except (FileNotFoundError, OSError) as exc:
        raise ModelArtifactError(
            "the bundled demo model is missing from this installation",
            hint="reinstall leuk-fhir or pass --model with a trained model file",
        ) from exc


def load_classifier(
    path: Path | None = None, device: str = "auto", batch_size: int = 64
) -> CellClassifier:
    """Load a model file; ``None`` loads the bundled demo model (not for clinical use)."""
    artifact = (
        read_artifact(_demo_model_bytes(), where="bundled demo model")
        if path is None
        else read_artifact(Path(path))
    )
    return CellClassifier(artifact, device=device, batch_size=batch_size)


def save_pipeline(
    path: Path,
    pipeline: FittedPipeline,
    *,
    name: str,
    version: str,
    is_demo: bool,
    training: dict[str, Any],
    metrics: dict[str, float],
    evaluation: dict[str, Any] | None = None,
    description: str = "",
    classes: tuple[CellClass, ...] | None = None,
) -> str:
    """Write a fitted pipeline as a model file; return its SHA-256."""
    from leuk_fhir import __version__

    classes = classes or tuple(cell_class_for(c) for c in pipeline.class_names)
    hosvd_meta, hosvd_arrays = pipeline.hosvd.to_state()
    manifest = {
        "name": name,
        "version": version,
        "is_demo": is_demo,
        "description": description,
        "written_by": f"leuk-fhir {__version__}",
        "classes": class_records(classes),
        "preprocessing": {
            "image_size": pipeline.config.image_size,
            "crop": pipeline.config.crop,
            "resize": "pad to square with the border colour, keep the central `crop` fraction, "
            "then bilinear resize",
            "mean": [float(v) for v in pipeline.mean],
            "std": [float(v) for v in pipeline.std],
            "input": "RGB uint8",
            "dihedral_average": pipeline.config.dihedral_average,
            "focus_floor": pipeline.focus_floor,
        },
        "cnn": {
            "n_classes": len(pipeline.class_names),
            "widths": list(pipeline.config.widths),
            "stage_depths": list(pipeline.config.stage_depths),
            "feature_grid": pipeline.config.feature_grid,
            "feature_stages": pipeline.config.feature_stages,
            "subclass_parents": list(pipeline.cnn.config.subclass_parents),
            "subclass_names": (
                [] if pipeline.subclasses is None else list(pipeline.subclasses.names)
            ),
        },
        "hosvd": hosvd_meta,
        "training": training,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "evaluation": evaluation,
    }
    state = {k: v.detach().cpu().numpy() for k, v in pipeline.cnn.state_dict().items()}
    return write_artifact(path, manifest, state, hosvd_arrays)
