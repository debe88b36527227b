"""External validation: a trained model scored on labelled cells it was not trained on.

Cross-validation (``evaluate``) measures a recipe on one dataset. Before a laboratory relies on
a model it asks how that very model does on its own cells: another site, microscope, camera or
stain. ``validate`` runs the model file as ``predict`` and the service do (its framing, image
size, CNN, HOSVD head and indeterminate rule) over a labelled dataset and reports each head's
accuracy and per-class figures beside the model's own cross-validated figures, the share
answered ``indeterminate`` and the HOSVD head's accuracy on the cells it does answer, every
misclassified cell, and one row per image (``predictions.csv``).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from leuk_fhir.errors import DatasetError
from leuk_fhir.model.classifier import CellClassifier
from leuk_fhir.model.dataset import CellDataset, class_key
from leuk_fhir.model.evaluation import (
    ERROR_SHEET_CELLS,
    dropped_text,
    error_lines,
    figure_lines,
    per_class_lines,
    per_class_metrics,
    percent,
    plot_confusion,
    plot_errors,
    plot_roc,
)
from leuk_fhir.model.machine import describe_machine, machine_text
from leuk_fhir.model.statistics import (
    comparison_text,
    mcnemar,
    mean_of_known,
    wilson_interval,
)

#: The heads a model file carries (the SVM baseline is fitted only inside ``evaluate``).
HEADS = ("hosvd", "softmax")


def match_classes(model_names: tuple[str, ...], data_names: tuple[str, ...]) -> np.ndarray:
    """Index into ``model_names`` of each class of the data: the class of that exact name,
    else the one class equal but for case, spacing or Unicode form. Raises
    :class:`DatasetError` for a class the model does not know, one that matches several of
    its classes, or two data classes that would be scored as one."""
    folded: dict[str, list[int]] = {}
    for i, name in enumerate(model_names):
        folded.setdefault(class_key(name), []).append(i)
    index: list[int] = []
    for name in data_names:
        if name in model_names:
            index.append(model_names.index(name))
            continue
        candidates = folded.get(class_key(name), [])
        if len(candidates) > 1:
            raise DatasetError(
                f"the data's class {name!r} could be any of the model's classes "
                f"{[model_names[i] for i in candidates]}",
                hint="name the class folder exactly as the model's class",
            )
        index.append(candidates[0] if candidates else -1)
    unknown = [name for name, i in zip(data_names, index, strict=True) if i < 0]
    if unknown:
        raise DatasetError(
            f"the data has class(es) {unknown} that the model does not know; its classes are "
            f"{list(model_names)}",
            hint="name the class folders as the model's classes, or use --binary-positive to "
            "score a two-class model on a dataset of more classes",
        )
    for i in sorted(set(index)):
        same = [name for name, j in zip(data_names, index, strict=True) if j == i]
        if len(same) > 1:
            raise DatasetError(
                f"the data's classes {same} would all be scored as the model's {model_names[i]!r}",
                hint="merge them into one folder, or rename them",
            )
    return np.array(index, dtype=np.int64)


def validate_model(
    classifier: CellClassifier, dataset: CellDataset, progress: bool = False
) -> dict[str, Any]:
    """Score ``classifier`` on ``dataset`` (prepared with the model's image size and framing).

    Returns the report :func:`write_validation_report` writes; keys starting with ``_`` hold
    arrays for the plots and ``predictions.csv``."""
    start = time.perf_counter()
    names = list(classifier.class_names)
    y = match_classes(classifier.class_names, dataset.class_names)[dataset.y]
    chunk = 512
    parts = []
    starts = range(0, len(dataset.images), chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="classifying", unit="batch")
    for first in starts:
        parts.append(classifier.run_prepared(dataset.images[first : first + chunk]))
    residuals = np.concatenate([p.residuals for p in parts])
    scores = {
        "hosvd": np.concatenate([p.probabilities for p in parts]),
        "softmax": np.concatenate([p.softmax for p in parts]),
    }
    predicted = {"hosvd": residuals.argmin(axis=1), "softmax": scores["softmax"].argmax(axis=1)}
    indeterminate = np.concatenate([p.ood_scores for p in parts]) > 1.0
    out_of_focus = np.concatenate([p.focus_scores for p in parts]) > 1.0

    from sklearn.metrics import confusion_matrix

    heads: dict[str, Any] = {}
    for head in HEADS:
        per_class = per_class_metrics(y, predicted[head], scores[head], len(names))
        right = predicted[head] == y
        heads[head] = {
            "accuracy": float(np.mean(right)),
            "accuracy_ci95": wilson_interval(int(right.sum()), len(y)),
            "macro_f1": mean_of_known(per_class["f1"]),
            "macro_auc": mean_of_known(per_class["auc"]),
            "per_class": {
                name: {metric: values[c] for metric, values in per_class.items()}
                for c, name in enumerate(names)
            },
            "confusion_matrix": confusion_matrix(
                y, predicted[head], labels=list(range(len(names)))
            ).tolist(),
        }
    answered = ~indeterminate
    heads["hosvd"]["answered_accuracy"] = (
        float(np.mean(predicted["hosvd"][answered] == y[answered])) if answered.any() else None
    )
    manifest = classifier.artifact.manifest
    trained_on = manifest.get("training", {}).get("data", {})
    misclassified = {
        head: sorted(
            (
                {
                    "path": dataset.paths[i],
                    "true": names[y[i]],
                    "predicted": names[predicted[head][i]],
                    "score": round(float(scores[head][i, predicted[head][i]]), 4),
                    **({"indeterminate": bool(indeterminate[i])} if head == "hosvd" else {}),
                }
                for i in np.flatnonzero(predicted[head] != y)
            ),
            key=lambda r: (-r["score"], r["path"]),
        )
        for head in HEADS
    }
    patients = (
        None
        if dataset.groups is None
        else _per_patient(dataset.groups, y, predicted["hosvd"], indeterminate, names)
    )
    if patients is not None:
        patients["grouping"] = dataset.grouping
    position = {path: i for i, path in enumerate(dataset.paths)}
    shown = misclassified["hosvd"][:ERROR_SHEET_CELLS]
    return {
        "kind": "external validation",
        "model": {
            "name": manifest.get("name"),
            "version": manifest.get("version"),
            "sha256": classifier.artifact.sha256,
            "is_demo": bool(manifest.get("is_demo", False)),
            "image_size": classifier.image_size,
            "crop": classifier.crop,
            "trained_on": {k: trained_on.get(k) for k in ("source", "images", "fingerprint")},
            "cross_validation": manifest.get("evaluation"),
        },
        "same_data_as_training": trained_on.get("fingerprint") == dataset.fingerprint,
        "dataset": dataset.summary(),
        "class_names": names,
        "classes_without_images": [n for c, n in enumerate(names) if not np.any(y == c)],
        "images": int(len(y)),
        "machine": describe_machine(classifier.device),
        "seconds_total": round(time.perf_counter() - start, 1),
        "indeterminate_rate": float(indeterminate.mean()) if len(y) else 0.0,
        "out_of_focus_rate": float(out_of_focus.mean()) if len(y) else 0.0,
        "heads": heads,
        "head_comparisons": [
            {
                "a": "hosvd",
                "b": "softmax",
                **mcnemar(predicted["hosvd"] == y, predicted["softmax"] == y),
            }
        ],
        "patients": patients,
        "misclassified": misclassified,
        "_error_crops": dataset.images[[position[e["path"]] for e in shown]],
        "_roc": {h: {"true": y, "scores": scores[h]} for h in HEADS},
        "_paths": dataset.paths,
        "_rows": {
            "true": y,
            "predicted": predicted,
            "scores": scores,
            "indeterminate": indeterminate,
            "out_of_focus": out_of_focus,
        },
    }


def _per_patient(
    groups: np.ndarray,
    y: np.ndarray,
    predicted: np.ndarray,
    indeterminate: np.ndarray,
    names: list[str],
) -> dict[str, Any]:
    """Each patient's cells and HOSVD answers, and whether the answer most of its cells get
    (indeterminate ones left out) is the patient's class (the class most of its cells have)."""
    rows = []
    for group in sorted(set(groups.tolist())):
        cells = groups == group
        true_counts = np.bincount(y[cells], minlength=len(names))
        answered = cells & ~indeterminate
        answer_counts = np.bincount(predicted[answered], minlength=len(names))
        truth = names[int(true_counts.argmax())]
        answer = names[int(answer_counts.argmax())] if answered.any() else None
        rows.append(
            {
                "patient": str(group),
                "cells": int(cells.sum()),
                "true": truth,
                "mixed_labels": bool(np.count_nonzero(true_counts) > 1),
                "answers": {n: int(c) for n, c in zip(names, answer_counts, strict=True) if c},
                "indeterminate": int((cells & indeterminate).sum()),
                "answer": answer,
                "right": answer == truth,
            }
        )
    right = sum(bool(r["right"]) for r in rows)
    return {
        "count": len(rows),
        "accuracy": right / len(rows),
        "accuracy_ci95": wilson_interval(right, len(rows)),
        "rows": rows,
    }


#: Patients listed in report.md (all of them are in report.json).
PATIENT_ROWS = 100


def _patient_lines(patients: dict[str, Any] | None) -> list[str]:
    if patients is None:
        return []
    low, high = patients["accuracy_ci95"]
    lines = [
        "## Per patient (HOSVD head)",
        "",
        f"{patients['count']} patients, from {patients['grouping']}. A patient's answer is the "
        "class most of its cells are given (indeterminate cells left out), its class the one "
        f"most of its cells carry: right for {percent(patients['accuracy'])}% of the patients "
        f"(95% CI {percent(low)}-{percent(high)}). This counts cells, it is not a diagnostic "
        "rule.",
        "",
        "| Patient | Class | Cells | HOSVD answers | Indeterminate | Answer | Right |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in patients["rows"][:PATIENT_ROWS]:
        answers = ", ".join(f"{n} {c}" for n, c in r["answers"].items())
        mixed = " (mixed labels)" if r["mixed_labels"] else ""
        lines.append(
            f"| {r['patient']} | {r['true']}{mixed} | {r['cells']} | {answers} | "
            f"{r['indeterminate']} | {r['answer'] or 'none'} | {'yes' if r['right'] else 'no'} |"
        )
    if patients["count"] > PATIENT_ROWS:
        lines.append(f"\n(first {PATIENT_ROWS} of {patients['count']}; all in report.json)")
    return [*lines, ""]


def render_validation_markdown(report: dict[str, Any]) -> str:
    """``report.md`` of an external validation."""
    model, data = report["model"], report["dataset"]
    trained = model["trained_on"]
    demo = " **Demo model, not for clinical use.**" if model["is_demo"] else ""
    crop = float(model["crop"])
    framing = "the whole image" if crop >= 1.0 else f"the central {crop:.0%} of each image"
    lines = [
        "# leuk-fhir external validation report",
        "",
        f"Model: {model['name']} {model['version']} (sha256 `{model['sha256'][:16]}...`), "
        f"trained on `{trained.get('source')}` ({trained.get('images')} images).{demo}",
        "",
        f"Data: `{data['source']}`: {report['images']} images, classes {data['classes']}; "
        f"{dropped_text(data)}prepared as the "
        f"model prepares every image ({model['image_size']} px, {framing}); "
        f"{report['seconds_total']:.0f} s on "
        f"{machine_text(report.get('machine'))}.",
        "",
    ]
    if report["same_data_as_training"]:
        lines += [
            "**These are the images the model was trained on** (same files and labels): the "
            "figures below are training accuracy, not validation.",
            "",
        ]
    if report["classes_without_images"]:
        lines += [
            f"Classes of the model with no images here: {report['classes_without_images']} "
            "(their sensitivity and AUC are n/a).",
            "",
        ]
    cv = model.get("cross_validation") or {}
    cv_heads = cv.get("heads", {})
    lines += [
        "## Accuracy per head (%)",
        "",
        "| Head | Accuracy (95% CI) | Macro F1 | Macro AUC | The model's own cross-validation |",
        "|---|---|---|---|---|",
    ]
    for head, s in report["heads"].items():
        own = cv_heads.get(head)
        own_text = (
            f"{percent(own['accuracy_mean'])} +- {percent(own['accuracy_std'])} "
            f"({cv.get('folds')} folds, {cv.get('images')} images)"
            if own
            else "not recorded (train with --cv-folds K)"
        )
        interval = s["accuracy_ci95"]
        ci = "" if interval is None else f" ({percent(interval[0])}-{percent(interval[1])})"
        lines.append(
            f"| {head} | {percent(s['accuracy'])}{ci} | {percent(s['macro_f1'])} | "
            f"{percent(s['macro_auc'])} | {own_text} |"
        )
    lines += [
        "",
        *[f"- {comparison_text(c['a'], c['b'], c)}" for c in report["head_comparisons"]],
    ]
    own_rate = cv.get("indeterminate_rate_mean")
    lines += [
        "",
        f"Answered `indeterminate` by the HOSVD head: {percent(report['indeterminate_rate'])}% "
        f"of the cells (out of focus: {percent(report['out_of_focus_rate'])}%)"
        + (
            f", against {percent(own_rate)}% of held-out cells in the model's own cross-validation"
            if own_rate is not None
            else ""
        )
        + f". HOSVD accuracy on the cells it answers: "
        f"{percent(report['heads']['hosvd']['answered_accuracy'])}%. The accuracies above count "
        "every cell, indeterminate ones with their nearest class. Far more indeterminate "
        "answers than in cross-validation, or a large drop in accuracy, mean these cells look "
        "unlike the training cells (another microscope, stain or magnification): retrain on "
        "this site's cells.",
        "",
    ]
    lines += per_class_lines(report["heads"], "Per class (%)")
    lines += ["", *_patient_lines(report.get("patients"))]
    lines += [*figure_lines("Confusion matrices"), "Every image's answer: `predictions.csv`.", ""]
    lines += error_lines(
        report["misclassified"]["hosvd"],
        "Indeterminate",
        lambda e: "yes" if e["indeterminate"] else "no",
    )
    return "\n".join(lines)


def write_validation_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write report.json, report.md, predictions.csv, confusion_matrix.png, roc.png and
    errors_hosvd.png into ``out_dir``; returns the path of report.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out_dir / "report.json").write_text(json.dumps(public, indent=2), encoding="utf-8")
    names = report["class_names"]
    rows = report["_rows"]
    with (out_dir / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "true", "hosvd", "hosvd_probability", "indeterminate", "out_of_focus"]
            + ["softmax", "softmax_probability"]
        )
        for i, path in enumerate(report["_paths"]):
            hosvd, soft = rows["predicted"]["hosvd"][i], rows["predicted"]["softmax"][i]
            writer.writerow(
                [
                    path,
                    names[rows["true"][i]],
                    names[hosvd],
                    f"{rows['scores']['hosvd'][i, hosvd]:.4f}",
                    int(rows["indeterminate"][i]),
                    int(rows["out_of_focus"][i]),
                    names[soft],
                    f"{rows['scores']['softmax'][i, soft]:.4f}",
                ]
            )
    plot_confusion(
        names,
        {h: (s["confusion_matrix"], s["accuracy"]) for h, s in report["heads"].items()},
        out_dir / "confusion_matrix.png",
    )
    plot_roc(names, report["_roc"], out_dir / "roc.png", "all images")
    crops = report["_error_crops"]
    if len(crops):
        plot_errors(report["misclassified"]["hosvd"], crops, out_dir / "errors_hosvd.png")
    (out_dir / "report.md").write_text(render_validation_markdown(report), encoding="utf-8")
    return out_dir / "report.json"
