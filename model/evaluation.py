"""k-fold evaluation of the three heads on the same folds, and the report files.

``cross_validate`` trains one CNN per fold and scores the ``hosvd``, ``softmax`` and ``svm``
heads on the held-out fold; ``write_report`` writes ``report.json``, ``report.md`` and the
confusion-matrix and ROC plots (PNG).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from leuk_fhir.model.dataset import CellDataset, stratified_folds
from leuk_fhir.model.training import HEADS, TrainingConfig, fit_pipeline


def per_class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, n_classes: int
) -> dict[str, list[float | None]]:
    """Sensitivity, specificity, precision, F1 and one-vs-rest AUC for each class index."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, list[float | None]] = {
        k: [] for k in ("sensitivity", "specificity", "precision", "f1", "auc")
    }
    for c in range(n_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        tn = int(np.sum((y_pred != c) & (y_true != c)))
        sens = tp / (tp + fn) if tp + fn else None
        spec = tn / (tn + fp) if tn + fp else None
        prec = tp / (tp + fp) if tp + fp else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
        positives = y_true == c
        auc = (
            float(roc_auc_score(positives, scores[:, c]))
            if 0 < positives.sum() < len(y_true)
            else None
        )
        for key, value in zip(
            ("sensitivity", "specificity", "precision", "f1", "auc"),
            (sens, spec, prec, f1, auc),
            strict=True,
        ):
            out[key].append(value)
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def cross_validate(
    dataset: CellDataset, folds: int, config: TrainingConfig, progress: bool = False
) -> dict[str, Any]:
    """Train and score every head on the same ``folds`` deterministic (grouped) splits."""
    splits = stratified_folds(dataset.labels, folds, seed=config.seed, groups=dataset.groups)
    y = dataset.y
    n_classes = len(dataset.class_names)
    fold_records: list[dict[str, Any]] = []
    pooled: dict[str, dict[str, list[np.ndarray]]] = {
        h: {"true": [], "pred": [], "scores": []} for h in HEADS
    }
    ood_flags: list[np.ndarray] = []
    start = time.perf_counter()
    iterator = enumerate(splits)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(splits), desc="cross-validation", unit="fold")
    for i, (train, test) in iterator:
        t0 = time.perf_counter()
        pipeline = fit_pipeline(
            dataset.images[train],
            y[train],
            dataset.class_names,
            replace(config, seed=config.seed + i),
            progress=progress,
            description=f"fold {i + 1}/{len(splits)} CNN",
        )
        t1 = time.perf_counter()
        maps, soft = pipeline.features(dataset.images[test])
        heads = pipeline.heads_from_features(maps, soft)
        flags = pipeline.hosvd.is_out_of_distribution(maps)
        ood_flags.append(flags)
        t2 = time.perf_counter()
        record: dict[str, Any] = {
            "fold": i + 1,
            "train_images": int(len(train)),
            "test_images": int(len(test)),
            "epochs": pipeline.history.epochs,
            "precision": pipeline.history.precision,
            "seconds_train": round(t1 - t0, 2),
            "seconds_test": round(t2 - t1, 2),
            "seconds_parts": {k: round(v, 2) for k, v in pipeline.seconds.items()},
            "hosvd_selection": {
                "channel_rank": pipeline.hosvd.channel_rank_,
                "position_rank": pipeline.hosvd.position_rank_,
                "n_basis": pipeline.hosvd.n_basis_,
                "n_subspaces": pipeline.hosvd.n_subspaces_,
                "inner_cv_accuracy": pipeline.hosvd.cv_accuracy_,
            },
            "indeterminate_rate": float(flags.mean()),
            "heads": {},
        }
        for head, output in heads.items():
            pooled[head]["true"].append(y[test])
            pooled[head]["pred"].append(output.predicted)
            pooled[head]["scores"].append(output.scores)
            record["heads"][head] = {
                "accuracy": float(np.mean(output.predicted == y[test])),
                "per_class": per_class_metrics(y[test], output.predicted, output.scores, n_classes),
            }
        fold_records.append(record)
        if bar is not None:
            bar.set_postfix({h: f"{record['heads'][h]['accuracy']:.3f}" for h in record["heads"]})
            bar.update(1)
    if bar is not None:
        bar.close()
    from sklearn.metrics import confusion_matrix

    summary: dict[str, Any] = {}
    for head in HEADS:
        if not pooled[head]["true"]:
            continue
        accs = [f["heads"][head]["accuracy"] for f in fold_records]
        per_class: dict[str, dict[str, float | None]] = {}
        for ci, name in enumerate(dataset.class_names):
            per_class[name] = {
                metric: _mean([f["heads"][head]["per_class"][metric][ci] for f in fold_records])
                for metric in ("sensitivity", "specificity", "precision", "f1", "auc")
            }
        true = np.concatenate(pooled[head]["true"])
        pred = np.concatenate(pooled[head]["pred"])
        summary[head] = {
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "macro_f1_mean": _mean([v["f1"] for v in per_class.values()]),
            "macro_auc_mean": _mean([v["auc"] for v in per_class.values()]),
            "per_class": per_class,
            "confusion_matrix": confusion_matrix(
                true, pred, labels=list(range(n_classes))
            ).tolist(),
        }
    report = {
        "dataset": dataset.summary(),
        "class_names": list(dataset.class_names),
        "folds": folds,
        "grouped": dataset.groups is not None,
        "images": int(len(y)),
        "config": config.to_json(),
        "seconds_total": round(time.perf_counter() - start, 1),
        "indeterminate_rate_mean": float(np.mean([f["indeterminate_rate"] for f in fold_records])),
        "heads": summary,
        "per_fold": fold_records,
    }
    report["_roc"] = {
        h: {
            "true": np.concatenate(pooled[h]["true"]),
            "scores": np.concatenate(pooled[h]["scores"]),
        }
        for h in HEADS
        if pooled[h]["true"]
    }
    return report


def _plot_confusion(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["class_names"]
    heads = list(report["heads"])
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 4.0), squeeze=False)
    for ax, head in zip(axes[0], heads, strict=True):
        cm = np.array(report["heads"][head]["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        ax.set_title(f"{head} ({100 * report['heads'][head]['accuracy_mean']:.2f}%)")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (r, c), v in np.ndenumerate(cm):
            ax.text(
                c,
                r,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if v < cm.max() / 2 else "white",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_roc(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    names = report["class_names"]
    roc = report["_roc"]
    fig, axes = plt.subplots(1, len(roc), figsize=(4.2 * len(roc), 4.0), squeeze=False)
    for ax, (head, data) in zip(axes[0], roc.items(), strict=True):
        classes = [len(names) - 1] if len(names) == 2 else range(len(names))
        for c in classes:
            fpr, tpr, _ = roc_curve(data["true"] == c, data["scores"][:, c])
            ax.plot(fpr, tpr, label=names[c], lw=1.2)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"ROC, {head} (pooled folds)")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _epochs_text(report: dict[str, Any]) -> str:
    if report["config"]["epochs"]:
        return str(report["config"]["epochs"])
    used = sorted({f["epochs"] for f in report["per_fold"]})
    return "auto (" + ", ".join(map(str, used)) + ")"


def render_markdown(report: dict[str, Any]) -> str:
    data = report["dataset"]
    lines = [
        "# leuk-fhir evaluation report",
        "",
        f"Data: `{data['source']}`: {report['images']} images, classes {data['classes']}; "
        f"{data['duplicates_dropped']} byte-identical duplicate(s) dropped; "
        f"{report['folds']}-fold {'grouped ' if report['grouped'] else ''}stratified cross-validation; "
        f"image size {report['config']['image_size']} px, {_epochs_text(report)} epochs; "
        f"{report['seconds_total']:.0f} s in total.",
        "",
        "## Accuracy per head (mean +- std over folds, %)",
        "",
        "| Head | Accuracy | Macro F1 | Macro AUC |",
        "|---|---|---|---|",
    ]
    for head, s in report["heads"].items():
        lines.append(
            f"| {head} | {_fmt(s['accuracy_mean'])} +- {_fmt(s['accuracy_std'])} | {_fmt(s['macro_f1_mean'])} | {_fmt(s['macro_auc_mean'])} |"
        )
    lines += [
        "",
        f"HOSVD out-of-distribution flag on held-out in-distribution cells: "
        f"{_fmt(report['indeterminate_rate_mean'])}% (these are still counted with their nearest class above).",
        "",
        "## Per class (mean over folds, %)",
        "",
        "| Head | Class | Sensitivity | Specificity | Precision | F1 | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for head, s in report["heads"].items():
        for name, m in s["per_class"].items():
            lines.append(
                f"| {head} | {name} | {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | "
                f"{_fmt(m['precision'])} | {_fmt(m['f1'])} | {_fmt(m['auc'])} |"
            )
    lines += [
        "",
        "## Per fold (accuracy %)",
        "",
        "| Fold | "
        + " | ".join(report["heads"])
        + " | HOSVD ranks / basis / sub-classes | train s |",
        "|---" * (len(report["heads"]) + 3) + "|",
    ]
    for f in report["per_fold"]:
        sel = f["hosvd_selection"]
        lines.append(
            f"| {f['fold']} | "
            + " | ".join(_fmt(f["heads"][h]["accuracy"]) for h in report["heads"])
            + f" | ({sel['channel_rank']}, {sel['position_rank']}) / {sel['n_basis']} / {sel['n_subspaces']} | {f['seconds_train']:.0f} |"
        )
    lines += [
        "",
        "## Confusion matrices (pooled over folds)",
        "",
        "![confusion matrices](confusion_matrix.png)",
        "",
        "## ROC curves",
        "",
        "![ROC curves](roc.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write report.json, report.md, confusion_matrix.png and roc.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out_dir / "report.json").write_text(json.dumps(public, indent=2), encoding="utf-8")
    _plot_confusion(report, out_dir / "confusion_matrix.png")
    _plot_roc(report, out_dir / "roc.png")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return out_dir / "report.json"


def evaluation_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact evaluation block stored in a model file's manifest."""
    return {
        "folds": report["folds"],
        "images": report["images"],
        "indeterminate_rate_mean": report["indeterminate_rate_mean"],
        "heads": {
            h: {
                k: s[k]
                for k in ("accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_auc_mean")
            }
            for h, s in report["heads"].items()
        },
    }


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics for :class:`~leuk_fhir.findings.ModelInfo`."""
    out: dict[str, float] = {"folds": float(report["folds"]), "images": float(report["images"])}
    for head, s in report["heads"].items():
        out[f"{head}_accuracy_mean"] = s["accuracy_mean"]
        out[f"{head}_accuracy_std"] = s["accuracy_std"]
    out["accuracy_mean"] = report["heads"]["hosvd"]["accuracy_mean"]
    out["indeterminate_rate"] = report["indeterminate_rate_mean"]
    return out
