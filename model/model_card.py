"""Model cards rendered from a model file's manifest (what it was trained on, how it measured)."""

from __future__ import annotations

from typing import Any

from leuk_fhir.model.artifact import stage_depths_of
from leuk_fhir.model.machine import machine_text

DEMO_WARNING = (
    "> **DEMO MODEL - NOT FOR CLINICAL USE.** Trained only on procedurally generated synthetic "
    "cells. Its figures say nothing about real blood smears. Train your own model on licensed, "
    "labelled data (`leuk-fhir train`) before any real use."
)


#: the weight decay of every model file written before it was recorded (2026-11-27)
OLD_WEIGHT_DECAY = 5e-4


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.2f}%"


def _stages_text(cnn: dict[str, Any]) -> str:
    stages = int(cnn.get("feature_stages", 1))
    if stages == 1:
        return "last feature maps"
    return f"feature maps of the last {stages} stages (scaled to equal energy, stacked)"


def _framing_text(prep: dict[str, Any], data: dict[str, Any]) -> str:
    crop = float(prep.get("crop", 1.0))
    how = data.get("framing", {}).get("method")
    if crop >= 1.0:
        return "the whole image kept" + (" (auto framing)" if how == "auto" else "")
    chosen = " (measured from the training images' nuclei)" if how == "auto" else ""
    return f"its central {crop:.0%} kept{chosen}"


def _subspaces_text(n_subspaces: int, cnn: dict[str, Any]) -> str:
    names = cnn.get("subclass_names") or []
    if not n_subspaces and names:
        return (
            f"one subspace per labelled kind of cell ({', '.join(names)}; the softmax head is "
            "trained on the same kinds), a class's residual the smallest of its kinds'"
        )
    return f"{n_subspaces} sub-class subspace(s) per class"


def _left_out_text(data: dict[str, Any]) -> str:
    """Images left out for conflicting labels and files skipped, when there were any."""
    text = ""
    if data.get("duplicate_label_conflicts"):
        # files written before conflicts were left out kept the first copy's label
        fate = "left out" if "duplicate_conflicts" in data else "kept with one of the labels"
        text += (
            f"; images whose byte-identical copies carry different labels ({fate}): "
            f"{data['duplicate_label_conflicts']}"
        )
    if data.get("skipped_files"):
        text += (
            f"; files or folders skipped (not images, outside the class folders, broken links, "
            f"hidden folders): {data['skipped_files']}"
        )
    return text


def render_model_card(manifest: dict[str, Any], sha256: str) -> str:
    """Markdown model card for a model manifest."""
    lines = [f"# Model card: {manifest['name']} {manifest['version']}", ""]
    if manifest.get("is_demo"):
        lines += [DEMO_WARNING, ""]
    lines += [
        "Decision support only: every result is AI-generated and stays preliminary until a "
        "clinician reviews it.",
        "",
        "## Identity",
        f"- Name / version: `{manifest['name']}` / `{manifest['version']}`",
        f"- Artifact SHA-256: `{sha256}`",
        f"- Written by: {manifest.get('written_by', 'unknown')}",
    ]
    if manifest.get("description"):
        lines.append(f"- Description: {manifest['description']}")
    lines += [
        "",
        "## Classes",
        "",
        "| Class | Meaning | Counts as blast | SNOMED CT |",
        "|---|---|---|---|",
    ]
    for c in manifest["classes"]:
        code = f"{c['snomed_code']} {c['snomed_display']}" if c.get("snomed_code") else "uncoded"
        lines.append(
            f"| `{c['name']}` | {c['display']} | {'yes' if c['is_blast'] else 'no'} | {code} |"
        )
    lines.append(
        "| `indeterminate` | out of distribution: residual to every class too high | no | - |"
    )
    training = manifest.get("training", {})
    data = training.get("data", {})
    prep = manifest["preprocessing"]
    hosvd = manifest["hosvd"]
    lines += [
        "",
        "## Training data",
        f"- Source: {data.get('source', 'unknown')}",
        f"- Images: {data.get('images', '?')} ({', '.join(f'{k}: {v}' for k, v in data.get('classes', {}).items())})",
        f"- Byte-identical duplicates dropped: {data.get('duplicates_dropped', 0)}"
        + _left_out_text(data),
        f"- Data fingerprint (SHA-256 over file digests and labels): `{data.get('fingerprint', 'unknown')}`",
        "",
        "## Method",
        f"- Input: RGB crop padded to a square, {_framing_text(prep, data)}, resized to "
        f"{prep['image_size']}x{prep['image_size']} px, normalised per channel.",
        f"- CNN: {len(manifest['cnn']['widths'])} stages of conv-BN-ReLU, widths {manifest['cnn']['widths']}, "
        f"convolutions per stage {list(stage_depths_of(manifest['cnn']))}; "
        f"{_stages_text(manifest['cnn'])} pooled to {manifest['cnn']['feature_grid']}x{manifest['cnn']['feature_grid']}; "
        "trained with flips, 90-degree rotations, shifts and stain/colour jitter.",
        f"- HOSVD classifier (Savas & Elden 2007): per class HOSVD of the channels x positions x samples "
        f"tensor, ranks ({hosvd['channel_rank']}, {hosvd['position_rank']}), {hosvd['n_basis']} basis "
        f"images, {_subspaces_text(hosvd['n_subspaces'], manifest['cnn'])}, chosen by inner "
        f"cross-validation (inner accuracy {_pct(hosvd.get('cv_accuracy'))}); probabilities by a "
        f"temperature ({hosvd['temperature']:.4g}) fitted on held-out residuals.",
        "- Out of distribution: `indeterminate` when the relative residual to the nearest class "
        "exceeds that class's threshold (1.15 x the 99.5th percentile of held-out nearest-class "
        "residuals) or the feature-map energy lies outside the range seen in training.",
    ]
    floor = manifest.get("preprocessing", {}).get("focus_floor")
    if floor is not None:
        lines.append(
            f"- Out of focus: `indeterminate` when a crop's sharpness (Laplacian RMS over contrast, "
            f"at the input size) is below {floor:.3g}, the 0.5th percentile of the training crops "
            "/ 1.15. A change of microscope (magnification, stain, mild defocus) is not caught: "
            "check the model on images from the microscope it serves."
        )
    config = training.get("config")
    if config:
        lines.append(
            f"- Training: {training.get('history', {}).get('epochs', config.get('epochs'))} "
            f"epochs, batch {config.get('batch_size')}, AdamW weight decay "
            f"{config.get('weight_decay', OLD_WEIGHT_DECAY):g}, seed {config.get('seed')}, "
            f"{training.get('history', {}).get('precision', 'float32')} arithmetic, "
            f"{config.get('augmentation', 'standard')} augmentation"
            + (
                f"; the CNN trained in {training.get('history', {}).get('seconds', 0):.0f} s on "
                f"{machine_text(training['machine'])}."
                if training.get("machine")
                else "."
            )
        )
    evaluation = manifest.get("evaluation")
    lines += ["", "## Measured performance", ""]
    if evaluation and evaluation.get("heads"):
        lines += [
            f"{evaluation.get('folds')}-fold cross-validation on the training data "
            f"({evaluation.get('images')} images"
            + (
                f", split by patient: {evaluation['groups']} groups from {evaluation['grouping']}"
                if evaluation.get("groups")
                else ", split image by image: no patient groups were given"
            )
            + "); mean +- std over folds:",
            "",
        ]
        # files written before the interval existed have none: no column then
        with_interval = any("accuracy_ci95" in f for f in evaluation["heads"].values())
        lines += (
            [
                "| Head | Accuracy | All held-out cells (95% CI) | Macro F1 | Macro AUC |",
                "|---|---|---|---|---|",
            ]
            if with_interval
            else ["| Head | Accuracy | Macro F1 | Macro AUC |", "|---|---|---|---|"]
        )
        for head, figures in evaluation["heads"].items():
            interval = figures.get("accuracy_ci95")
            pooled = (
                "n/a"
                if interval is None
                else f"{_pct(figures.get('accuracy_pooled'))} ({_pct(interval[0])}-"
                f"{_pct(interval[1])})"
            )
            lines.append(
                f"| {head} | {_pct(figures['accuracy_mean'])} +- {_pct(figures['accuracy_std'])} | "
                + (f"{pooled} | " if with_interval else "")
                + f"{_pct(figures.get('macro_f1_mean'))} | {_pct(figures.get('macro_auc_mean'))} |"
            )
        if "indeterminate_rate_mean" in evaluation:
            lines.append(
                f"\nIn-distribution test cells flagged indeterminate: {_pct(evaluation['indeterminate_rate_mean'])}."
            )
    else:
        lines.append("No cross-validated evaluation is stored in this model file.")
    metrics = manifest.get("metrics", {})
    if metrics:
        lines += [
            "",
            "Stored metrics: " + ", ".join(f"`{k}` = {v:.4g}" for k, v in sorted(metrics.items())),
        ]
    if manifest.get("ood"):
        lines += [
            "",
            "Out-of-distribution check: "
            + ", ".join(f"{k}: {_pct(v)} indeterminate" for k, v in manifest["ood"].items()),
        ]
    lines += [
        "",
        "## Limitations",
        "- Single-cell crops only; a whole smear field is not a cell and should come back indeterminate.",
        "- Accuracy measured by cross-validation on one data source does not transfer to other "
        "stains, scanners or sites; validate locally before use.",
        "- Not a diagnosis: an ALL diagnosis needs morphology review, flow cytometry and more.",
        "",
        "## References",
        "- B. Savas, L. Elden. Handwritten digit classification using higher order singular value "
        "decomposition. Pattern Recognition 40(3):993-1003, 2007.",
        "- L. De Lathauwer, B. De Moor, J. Vandewalle. A multilinear singular value decomposition. "
        "SIAM J. Matrix Anal. Appl. 21(4):1253-1278, 2000.",
        "",
    ]
    return "\n".join(lines)
