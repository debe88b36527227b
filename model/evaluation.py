"""k-fold evaluation of the three heads on the same folds, and the report files.

``cross_validate`` trains one CNN per fold and scores the ``hosvd``, ``softmax`` and ``svm``
heads on the held-out fold; ``write_report`` writes ``report.json``, ``report.md`` and the
confusion-matrix and ROC plots (PNG).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from leuk_fhir.errors import ResourceExhaustedError
from leuk_fhir.model.checkpoint import TrainingCheckpoint
from leuk_fhir.model.cnn import resolve_device, resolve_precision
from leuk_fhir.model.dataset import CellDataset, Subclasses, stratified_folds
from leuk_fhir.model.fold_store import CHECKPOINT_SUFFIX, FoldOutcome, FoldStore, run_identity
from leuk_fhir.model.framing import Framing
from leuk_fhir.model.machine import available_cores, describe_machine, machine_text
from leuk_fhir.model.statistics import (
    comparison_text,
    mcnemar,
    mean_of_known,
    wilson_interval,
)
from leuk_fhir.model.training import (
    HEADS,
    TrainingConfig,
    fit_pipeline,
    resolve_epochs,
)


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
        prec = tp / (tp + fp) if tp + fp else None
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


#: Folds run one after another below this much CNN work per fold (training images x epochs,
#: about 30 s of training on one core): starting a worker process costs a few seconds.
PARALLEL_MIN_WORK = 20_000
#: Auto parallel folds start at this many cores: each worker gets two or more threads. On two
#: cores two one-thread workers gained 4-13% (docs/model.md), not worth a default whose bf16
#: results differ in the last bits from the published two-thread figures.
PARALLEL_MIN_CORES = 4
#: Memory a fold worker needs besides its copy of the crops (torch, the CNN, a batch).
WORKER_OVERHEAD_BYTES = 3 << 29


@dataclass(frozen=True)
class FoldPlan:
    """How ``cross_validate`` spreads folds over processes: ``workers`` folds at a time, each
    with ``threads`` torch/BLAS threads (``threads`` 0 = leave the process's own setting)."""

    workers: int
    threads: int


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux ``MemAvailable``), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def plan_folds(
    folds: int,
    train_images: int,
    epochs: int,
    data_bytes: int,
    workers: int = 0,
    threads: int = 0,
) -> FoldPlan:
    """Workers and threads for ``folds`` folds (``workers`` 0 = auto).

    Auto, on ``PARALLEL_MIN_CORES`` or more cores, runs one fold per two cores at once (at most
    ``folds``, and no more than the available memory holds), each with ``cores / workers``
    threads: a CNN this small spreads poorly over many threads, and the HOSVD fits of the folds
    overlap. Fewer cores, or a job too small to pay for starting processes: one fold at a time,
    in this process.
    """
    if workers < 0 or threads < 0:
        raise ValueError("workers and threads must be >= 0")
    cores = available_cores()
    if workers == 0:
        if train_images * epochs < PARALLEL_MIN_WORK or cores < PARALLEL_MIN_CORES:
            workers = 1
        else:
            workers = min(folds, cores // 2)
            memory = available_memory()
            if memory is not None:
                workers = min(workers, max(1, memory // (2 * data_bytes + WORKER_OVERHEAD_BYTES)))
    workers = max(1, min(workers, folds))
    if threads == 0 and workers > 1:
        threads = max(1, cores // workers)
    return FoldPlan(workers, threads)


@dataclass(frozen=True)
class _FoldData:
    """What every fold trains and tests on (sent once to each worker process)."""

    images: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    subclasses: Subclasses | None
    sub_y: np.ndarray | None
    groups: np.ndarray | None = None

    @classmethod
    def of(cls, dataset: CellDataset) -> _FoldData:
        return cls(
            dataset.images,
            dataset.y,
            dataset.class_names,
            dataset.subclasses,
            dataset.sub_y,
            dataset.groups,
        )


def _run_fold(
    data: _FoldData,
    index: int,
    train: np.ndarray,
    test: np.ndarray,
    config: TrainingConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
    checkpoint: TrainingCheckpoint | None = None,
) -> FoldOutcome:
    """Fit the pipeline on one fold's training part and score every head on its test part
    (its CNN kept in, or continued from, ``checkpoint``)."""
    images, y, class_names = data.images, data.y, data.class_names
    t0 = time.perf_counter()
    pipeline = fit_pipeline(
        images[train],
        y[train],
        class_names,
        replace(config, seed=config.seed + index),
        on_epoch=on_epoch,
        subclasses=data.subclasses,
        sub_y=None if data.sub_y is None else data.sub_y[train],
        groups=None if data.groups is None else data.groups[train],
        checkpoint=checkpoint,
    )
    t1 = time.perf_counter()
    maps, soft = pipeline.features(images[test])
    heads = pipeline.heads_from_features(maps, soft)
    blurred = pipeline.out_of_focus(images[test])
    flags = pipeline.hosvd.is_out_of_distribution(maps) | blurred
    t2 = time.perf_counter()
    record: dict[str, Any] = {
        "fold": index + 1,
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
            "inner_cv_grouped": bool(pipeline.hosvd.cv_grouped_),
        },
        "test_groups": None if data.groups is None else sorted(set(data.groups[test].tolist())),
        "indeterminate_rate": float(flags.mean()),
        "out_of_focus_rate": float(blurred.mean()),
        "heads": {
            head: {
                "accuracy": float(np.mean(output.predicted == y[test])),
                "per_class": per_class_metrics(
                    y[test], output.predicted, output.scores, len(class_names)
                ),
            }
            for head, output in heads.items()
        },
    }
    return FoldOutcome(record, heads, flags)


def _epoch_bar(
    splits: list[tuple[np.ndarray, np.ndarray]],
    config: TrainingConfig,
    description: str,
    done: int = 0,
) -> Any:
    """One progress bar over every fold's CNN epochs (``done`` of them kept by a stopped run):
    its time estimate is the whole run's from the first epoch on (an hour on an AVX2-only
    2-core CPU: docs/model.md)."""
    from tqdm import tqdm

    total = sum(resolve_epochs(config.epochs, len(t), config.batch_size) for t, _ in splits)
    return tqdm(total=total, initial=done, desc=description, unit="epoch")


def _fold_line(record: dict[str, Any], n_folds: int) -> str:
    """``fold 2/5: hosvd 98.25%  softmax 98.00%  svm 98.12%  (train 680 s)``, written above the
    bar as each fold ends."""
    heads = "  ".join(f"{h} {100 * r['accuracy']:.2f}%" for h, r in record["heads"].items())
    return f"fold {record['fold']}/{n_folds}: {heads}  (train {record['seconds_train']:.0f} s)"


@contextmanager
def _thread_limit(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch and BLAS threads (0: as they are)."""
    if threads <= 0:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


#: State of a fold worker process, set once by :func:`_init_worker`.
_WORKER: dict[str, Any] = {}


def _init_worker(data: _FoldData, threads: int, events: Any) -> None:
    limit = _thread_limit(threads)
    limit.__enter__()  # for the life of the worker
    _WORKER.update(data=data, events=events, limit=limit)


def _worker_fold(
    index: int,
    train: np.ndarray,
    test: np.ndarray,
    config: TrainingConfig,
    checkpoint: TrainingCheckpoint | None,
) -> tuple[int, FoldOutcome]:
    events = _WORKER["events"]

    def on_epoch(epoch: int, loss: float, accuracy: float) -> None:
        events.put((index, epoch))

    outcome = _run_fold(
        _WORKER["data"], index, train, test, config, on_epoch=on_epoch, checkpoint=checkpoint
    )
    return index, outcome


def _run_parallel(
    dataset: CellDataset,
    splits: list[tuple[np.ndarray, np.ndarray]],
    todo: list[int],
    config: TrainingConfig,
    plan: FoldPlan,
    bar: Any,
    on_done: Callable[[int, FoldOutcome], None],
    checkpoints: dict[int, TrainingCheckpoint],
) -> None:
    """Folds ``todo`` in ``plan.workers`` spawned processes, ``on_done`` called in this process
    as each ends; ``bar`` (or None) counts all their epochs; ``checkpoints`` keep the CNNs'
    training states by fold."""
    import multiprocessing
    import queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    done_count = 0
    others = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(
        plan.workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(_FoldData.of(dataset), plan.threads, events),
    )
    try:
        pending = {
            pool.submit(_worker_fold, i, *splits[i], config, checkpoints.get(i)) for i in todo
        }
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            while True:
                try:
                    events.get_nowait()
                except queue.Empty:
                    break
                if bar is not None:
                    bar.update(1)
            for future in done:
                index, outcome = future.result()
                on_done(index, outcome)
                done_count += 1
                if bar is not None:
                    bar.set_postfix({"folds done": done_count})
                    bar.write(_fold_line(outcome.record, len(splits)), file=sys.stderr)
    except BrokenProcessPool as error:
        raise ResourceExhaustedError(
            "a cross-validation worker process died (out of memory?)",
            hint="run with --workers 1, or free memory",
        ) from error
    except KeyboardInterrupt:
        # Stopped: the folds in progress are lost either way, so end their workers now
        # instead of waiting minutes for them (or leaving them running if this process dies).
        for worker in set(multiprocessing.active_children()) - others:
            worker.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        events.close()


#: Misclassified held-out cells shown in the report's contact sheet (most confident first).
ERROR_SHEET_CELLS = 48


def _misclassified(
    dataset: CellDataset,
    outcomes: list[FoldOutcome],
    splits: list[tuple[np.ndarray, np.ndarray]],
) -> dict[str, list[dict[str, Any]]]:
    """Every held-out cell a head got wrong, most confident first: the list to review for
    label errors. ``score`` is the head's probability for its answer (the SVM's decision value)."""
    names = dataset.class_names
    out: dict[str, list[dict[str, Any]]] = {}
    for head in HEADS:
        rows: list[dict[str, Any]] = []
        for outcome, (_, test) in zip(outcomes, splits, strict=True):
            output = outcome.outputs.get(head)
            if output is None:
                continue
            truth = dataset.y[test]
            for j in np.flatnonzero(output.predicted != truth):
                row = {
                    "path": dataset.paths[test[j]],
                    "fold": outcome.record["fold"],
                    "true": names[truth[j]],
                    "predicted": names[output.predicted[j]],
                    "score": round(float(output.scores[j, output.predicted[j]]), 4),
                }
                if head == "hosvd":
                    row["indeterminate"] = bool(outcome.indeterminate[j])
                rows.append(row)
        out[head] = sorted(rows, key=lambda r: (-r["score"], r["path"]))
    return out


def _identity(
    dataset: CellDataset, splits: list[tuple[np.ndarray, np.ndarray]], config: TrainingConfig
) -> str:
    """Run identity of training ``config`` on ``dataset`` with ``splits`` (none: the final fit
    on all of it): everything the numbers depend on, the core count aside (the thread plan is
    kept when a run resumes)."""
    device = resolve_device(config.device)
    settings = {
        "config": config.to_json(),
        "folds": len(splits),
        "classes": list(dataset.class_names),
        "subclasses": dataset.summary()["subclasses"],
        "precision": str(resolve_precision(config.precision, device)),
        "machine": {k: v for k, v in describe_machine(device).items() if k != "cores"},
    }
    arrays = [dataset.images, dataset.y, dataset.sub_y, dataset.groups]
    return run_identity(arrays, splits, settings)


def final_fit_checkpoint(
    keep: Path, dataset: CellDataset, config: TrainingConfig
) -> TrainingCheckpoint:
    """Where the CNN of the model fitted on all of ``dataset`` keeps its training state."""
    return TrainingCheckpoint(
        Path(keep) / f"final{CHECKPOINT_SUFFIX}", f"{_identity(dataset, [], config)}/final"
    )


def cross_validate(
    dataset: CellDataset,
    folds: int,
    config: TrainingConfig,
    progress: bool = False,
    workers: int = 0,
    threads: int = 0,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Train and score every head on the same ``folds`` deterministic (grouped) splits.

    Folds run in parallel processes where that pays (see :func:`plan_folds`; ``workers`` 0 =
    auto). A fold's result depends on its seed and its thread count, not on which process ran
    it: the same plan gives the same report, in-process or not. With ``keep`` (a folder), each
    finished fold is written there and folds an earlier, interrupted run of the same job left
    there are reused, not trained again (:mod:`leuk_fhir.model.fold_store`).
    """
    config = replace(config, crop=dataset.framing.crop)
    splits = stratified_folds(dataset.labels, folds, seed=config.seed, groups=dataset.groups)
    y = dataset.y
    n_classes = len(dataset.class_names)
    start = time.perf_counter()
    device = resolve_device(config.device)
    machine = describe_machine(device)
    store = None if keep is None else FoldStore(keep, _identity(dataset, splits, config))
    kept: dict[int, FoldOutcome] = {}
    if store is not None:
        for i, (_, test) in enumerate(splits):
            outcome, note = store.load(i, len(test), n_classes)
            if note and progress:
                print(note, file=sys.stderr)
            if outcome is not None:
                kept[i] = outcome
                if progress:
                    line = _fold_line(outcome.record, len(splits))
                    print(f"{line}, kept from an earlier run in {store.path(i)}", file=sys.stderr)
    resumed = sorted(kept)
    todo = [i for i in range(len(splits)) if i not in kept]
    checkpoints = {} if store is None else {i: store.checkpoint(i) for i in todo}
    continued: dict[int, int] = {}  # fold: the epoch its CNN continues from
    for i, checkpoint in checkpoints.items():
        epochs = resolve_epochs(config.epochs, len(splits[i][0]), config.batch_size)
        epoch, note = checkpoint.resume_note(epochs, f"fold {i + 1}/{len(splits)}: its CNN")
        if epoch is not None:
            continued[i] = epoch
        if note and progress:
            print(note, file=sys.stderr)

    def finished(index: int, outcome: FoldOutcome) -> None:
        nonlocal store
        kept[index] = outcome
        if store is None:
            return
        try:
            store.save(index, outcome)
        except OSError as error:  # a full or read-only disk costs the resume, not the run
            print(
                f"cannot keep fold {index + 1} in {store.folder} ({error}); the run goes on, "
                "but if it is interrupted its folds are lost",
                file=sys.stderr,
            )
            store = None

    train_size = max(len(train) for train, _ in splits)
    plan = plan_folds(
        len(splits),
        train_size,
        resolve_epochs(config.epochs, train_size, config.batch_size),
        dataset.images.nbytes,
        workers,
        threads,
    )
    # Folds left by an interrupted run train with the threads the whole run would have used.
    plan = replace(plan, workers=max(1, min(plan.workers, len(todo))))
    remaining = [splits[i] for i in todo]
    bar = None
    if progress and todo:
        where = f", {plan.workers} folds at a time" if plan.workers > 1 else ""
        bar = _epoch_bar(
            remaining, config, f"cross-validation{where}", done=sum(continued.values())
        )
    try:
        if plan.workers > 1:
            _run_parallel(dataset, splits, todo, config, plan, bar, finished, checkpoints)
        else:
            data = _FoldData.of(dataset)
            with _thread_limit(plan.threads):
                for i in todo:

                    def on_epoch(epoch: int, loss: float, accuracy: float, fold: int = i) -> None:
                        if bar is not None:
                            bar.set_postfix(fold=f"{fold + 1}/{len(splits)}", loss=f"{loss:.3f}")
                            bar.update(1)

                    outcome = _run_fold(
                        data,
                        i,
                        *splits[i],
                        config,
                        on_epoch=on_epoch,
                        checkpoint=checkpoints.get(i),
                    )
                    finished(i, outcome)
                    if bar is not None:
                        bar.write(_fold_line(outcome.record, len(splits)), file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    outcomes = [kept[i] for i in range(len(splits))]
    fold_records = [o.record for o in outcomes]
    pooled: dict[str, dict[str, list[np.ndarray]]] = {
        h: {"true": [], "pred": [], "scores": []} for h in HEADS
    }
    for outcome, (_, test) in zip(outcomes, splits, strict=True):
        for head, output in outcome.outputs.items():
            pooled[head]["true"].append(y[test])
            pooled[head]["pred"].append(output.predicted)
            pooled[head]["scores"].append(output.scores)
    misclassified = _misclassified(dataset, outcomes, splits)
    from sklearn.metrics import confusion_matrix

    summary: dict[str, Any] = {}
    correct: dict[str, np.ndarray] = {}
    for head in HEADS:
        if not pooled[head]["true"]:
            continue
        accs = [f["heads"][head]["accuracy"] for f in fold_records]
        per_class: dict[str, dict[str, float | None]] = {}
        for ci, name in enumerate(dataset.class_names):
            per_class[name] = {
                metric: mean_of_known(
                    [f["heads"][head]["per_class"][metric][ci] for f in fold_records]
                )
                for metric in ("sensitivity", "specificity", "precision", "f1", "auc")
            }
        true = np.concatenate(pooled[head]["true"])
        pred = np.concatenate(pooled[head]["pred"])
        correct[head] = pred == true
        summary[head] = {
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            # every cell is held out once: the share right over all of them, and its interval
            "accuracy_pooled": float(correct[head].mean()),
            "accuracy_ci95": wilson_interval(int(correct[head].sum()), len(true)),
            "macro_f1_mean": mean_of_known([v["f1"] for v in per_class.values()]),
            "macro_auc_mean": mean_of_known([v["auc"] for v in per_class.values()]),
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
        "grouping": dataset.grouping,
        "images": int(len(y)),
        "config": config.to_json(),
        "seconds_total": round(time.perf_counter() - start, 1),
        "parallel": {"workers": plan.workers, "threads": plan.threads},
        "resumed_folds": [i + 1 for i in resumed],
        "continued_folds": {str(i + 1): epoch for i, epoch in sorted(continued.items())},
        "machine": machine,
        "indeterminate_rate_mean": float(np.mean([f["indeterminate_rate"] for f in fold_records])),
        "out_of_focus_rate_mean": float(np.mean([f["out_of_focus_rate"] for f in fold_records])),
        "heads": summary,
        "head_comparisons": [
            {"a": "hosvd", "b": other, **mcnemar(correct["hosvd"], correct[other])}
            for other in HEADS
            if other != "hosvd" and "hosvd" in correct and other in correct
        ],
        "per_fold": fold_records,
        "misclassified": misclassified,
    }
    shown = misclassified.get("hosvd", [])[:ERROR_SHEET_CELLS]
    position = {path: i for i, path in enumerate(dataset.paths)}
    report["_error_crops"] = {"hosvd": dataset.images[[position[e["path"]] for e in shown]]}
    report["_roc"] = {
        h: {
            "true": np.concatenate(pooled[h]["true"]),
            "scores": np.concatenate(pooled[h]["scores"]),
        }
        for h in HEADS
        if pooled[h]["true"]
    }
    return report


def plot_confusion(names: list[str], matrices: dict[str, tuple[Any, float]], path: Path) -> None:
    """One confusion matrix per head (``matrices``: head to (matrix, accuracy)), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(matrices)
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 4.0), squeeze=False)
    for ax, head in zip(axes[0], heads, strict=True):
        cm = np.array(matrices[head][0])
        ax.imshow(cm, cmap="Blues")
        ax.set_title(f"{head} ({100 * matrices[head][1]:.2f}%)")
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


def plot_roc(
    names: list[str], roc: dict[str, dict[str, np.ndarray]], path: Path, where: str
) -> None:
    """One-vs-rest ROC curves per head (``roc``: head to its ``true`` labels and ``scores``)
    over ``where`` (say, "pooled folds"), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, len(roc), figsize=(4.2 * len(roc), 4.0), squeeze=False)
    for ax, (head, data) in zip(axes[0], roc.items(), strict=True):
        classes = [len(names) - 1] if len(names) == 2 else range(len(names))
        for c in classes:
            positives = data["true"] == c
            if not 0 < positives.sum() < len(positives):
                continue  # no curve for a class with no cells, or with nothing else
            fpr, tpr, _ = roc_curve(positives, data["scores"][:, c])
            ax.plot(fpr, tpr, label=names[c], lw=1.2)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"ROC, {head} ({where})")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_errors(rows: list[dict[str, Any]], crops: np.ndarray, path: Path) -> None:
    """Contact sheet of misclassified cells (``rows`` as in ``misclassified``, ``crops`` their
    crops in the same order): crop, true -> predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[: len(crops)]
    columns = 8
    lines = -(-len(rows) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(columns * 1.5, lines * 1.75), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, crop, row in zip(axes.flat, crops, rows, strict=False):
        ax.imshow(crop)
        ax.set_title(
            f"{row['true'][:12]}\n-> {row['predicted'][:12]} {row['score']:.2f}", fontsize=6
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def percent(value: float | None) -> str:
    """A share as a percentage for reports (``n/a`` for None)."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def _epochs_text(report: dict[str, Any]) -> str:
    if report["config"]["epochs"]:
        return str(report["config"]["epochs"])
    used = sorted({f["epochs"] for f in report["per_fold"]})
    return "auto (" + ", ".join(map(str, used)) + ")"


def _precision_text(report: dict[str, Any]) -> str:
    return " and ".join(sorted({f.get("precision", "float32") for f in report["per_fold"]}))


def _parallel_text(report: dict[str, Any]) -> str:
    plan = report.get("parallel") or {}
    if plan.get("workers", 1) <= 1:
        return ""
    threads = f", {plan['threads']} thread(s) each" if plan.get("threads") else ""
    return f" ({plan['workers']} folds at a time{threads})"


def _resumed_text(report: dict[str, Any]) -> str:
    resumed = report.get("resumed_folds") or []
    continued = report.get("continued_folds") or {}
    text = ""
    if resumed:
        which = ", ".join(map(str, resumed))
        text += (
            f" Fold(s) {which} were kept from an earlier, interrupted run of the same job (same "
            "crops, splits, settings and software) and not trained again: the total above is "
            "this run's, their train times are from that run."
        )
    if continued:
        which = ", ".join(f"{fold} (from epoch {epoch})" for fold, epoch in continued.items())
        text += (
            f" The CNN of fold(s) {which} continued the training state an interrupted run of "
            "the same job kept, and is the CNN an uninterrupted run trains."
        )
    return text


def _subclasses_text(subclasses: dict[str, list[str]] | None) -> str:
    if not subclasses:
        return ""
    kinds = "; ".join(f"{c}: {', '.join(k)}" for c, k in subclasses.items() if len(k) > 1)
    return (
        f" Trained on the labelled kinds of cell inside the classes ({kinds}); every head "
        "answers with the classes, and all figures are for the classes."
    )


def _grouping_text(data: dict[str, Any], report: dict[str, Any]) -> str:
    if not report["grouped"]:
        return " (images split one by one: no patient groups given)"
    source = report.get("grouping") or "groups"
    return f" by patient ({data['groups']} groups from {source}; none on both sides of a split)"


def _pooled_text(head: dict[str, Any]) -> str:
    """``98.55 (98.14-98.87)``: the share right over all cells and its Wilson interval."""
    if head.get("accuracy_pooled") is None:
        return "n/a"  # reports written before the interval existed
    interval = head.get("accuracy_ci95")
    where = "" if interval is None else f" ({percent(interval[0])}-{percent(interval[1])})"
    return f"{percent(head['accuracy_pooled'])}{where}"


def _comparisons_lines(report: dict[str, Any]) -> list[str]:
    """The heads compared cell by cell (McNemar), for report.md."""
    comparisons = report.get("head_comparisons") or []
    if not comparisons:
        return []
    return [
        "",
        "Heads compared on the same cells (McNemar's exact test on the cells one gets right "
        "and the other wrong):",
        "",
        *[f"- {comparison_text(c['a'], c['b'], c)}" for c in comparisons],
    ]


def dropped_text(data: dict[str, Any]) -> str:
    """What a dataset summary says was left out, for report.md: duplicates, images whose
    copies carry different labels, skipped files."""
    text = f"{data['duplicates_dropped']} byte-identical duplicate(s) dropped; "
    if data.get("duplicate_label_conflicts"):
        text += (
            f"{data['duplicate_label_conflicts']} image(s) left out because byte-identical "
            "copies carry different labels (`duplicate_conflicts` in report.json); "
        )
    if data.get("skipped_files"):
        text += (
            f"{data['skipped_files']} file(s) or folder(s) skipped (not images, outside the "
            "class folders, broken links, hidden folders: `skipped` in report.json); "
        )
    return text


def render_markdown(report: dict[str, Any]) -> str:
    data = report["dataset"]
    lines = [
        "# leuk-fhir evaluation report",
        "",
        f"Data: `{data['source']}`: {report['images']} images, classes {data['classes']}; "
        f"{dropped_text(data)}"
        f"{report['folds']}-fold stratified cross-validation{_grouping_text(data, report)}; "
        f"image size {report['config']['image_size']} px, framing: "
        f"{Framing(**data['framing']).describe() if 'framing' in data else 'whole image'}; "
        f"{_epochs_text(report)} epochs; "
        f"{report['seconds_total']:.0f} s in total{_parallel_text(report)} on "
        f"{machine_text(report.get('machine'))}, CNNs trained in {_precision_text(report)}."
        + _resumed_text(report)
        + _subclasses_text(data.get("subclasses")),
        "",
        "## Accuracy per head (mean +- std over folds, %)",
        "",
        "| Head | Accuracy | All held-out cells (95% CI) | Macro F1 | Macro AUC |",
        "|---|---|---|---|---|",
    ]
    for head, s in report["heads"].items():
        lines.append(
            f"| {head} | {percent(s['accuracy_mean'])} +- {percent(s['accuracy_std'])} | "
            f"{_pooled_text(s)} | {percent(s['macro_f1_mean'])} | {percent(s['macro_auc_mean'])} |"
        )
    lines += _comparisons_lines(report)
    lines += [
        "",
        f"Held-out in-distribution cells answered `indeterminate`: "
        f"{percent(report['indeterminate_rate_mean'])}%, of which out of focus "
        f"{percent(report['out_of_focus_rate_mean'])}% (all are still counted with their nearest "
        "class above).",
        "",
    ]
    lines += per_class_lines(report["heads"], "Per class (mean over folds, %)")
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
            + " | ".join(percent(f["heads"][h]["accuracy"]) for h in report["heads"])
            + f" | ({sel['channel_rank']}, {sel['position_rank']}) / {sel['n_basis']} / {sel['n_subspaces'] or 'labelled'} | {f['seconds_train']:.0f} |"
        )
    lines += figure_lines("Confusion matrices (pooled over folds)")
    lines += error_lines(
        report.get("misclassified", {}).get("hosvd") or [], "Fold", lambda e: str(e["fold"])
    )
    return "\n".join(lines)


def per_class_lines(heads: dict[str, Any], title: str) -> list[str]:
    """A report.md section: each head's per-class figures (``heads``: head to ``per_class``)."""
    lines = [
        f"## {title}",
        "",
        "| Head | Class | Sensitivity | Specificity | Precision | F1 | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for head, s in heads.items():
        for name, m in s["per_class"].items():
            lines.append(
                f"| {head} | {name} | {percent(m['sensitivity'])} | {percent(m['specificity'])} | "
                f"{percent(m['precision'])} | {percent(m['f1'])} | {percent(m['auc'])} |"
            )
    return lines


def figure_lines(confusion_title: str) -> list[str]:
    """The report.md sections that show confusion_matrix.png and roc.png."""
    return [
        "",
        f"## {confusion_title}",
        "",
        "![confusion matrices](confusion_matrix.png)",
        "",
        "## ROC curves",
        "",
        "![ROC curves](roc.png)",
        "",
    ]


def error_lines(
    errors: list[dict[str, Any]], column: str, value: Callable[[dict[str, Any]], str]
) -> list[str]:
    """The report.md section of the HOSVD head's most confident errors (the first 20 of
    ``errors``, with one more ``column`` filled by ``value``) and errors_hosvd.png."""
    if not errors:
        return []
    lines = [
        f"## Misclassified cells, HOSVD head ({len(errors)}; all heads in report.json)",
        "",
        "Most confident errors first: the place to look for label errors.",
        "",
        f"| Image | {column} | True | Predicted | Probability |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{e['path']}` | {value(e)} | {e['true']} | {e['predicted']} | {e['score']:.3f} |"
        for e in errors[:20]
    ]
    return [*lines, "", "![most confident errors](errors_hosvd.png)", ""]


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write report.json, report.md, confusion_matrix.png, roc.png and errors_hosvd.png (the
    HOSVD head's most confident errors) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out_dir / "report.json").write_text(json.dumps(public, indent=2), encoding="utf-8")
    names = report["class_names"]
    plot_confusion(
        names,
        {h: (s["confusion_matrix"], s["accuracy_mean"]) for h, s in report["heads"].items()},
        out_dir / "confusion_matrix.png",
    )
    plot_roc(names, report["_roc"], out_dir / "roc.png", "pooled folds")
    crops = (report.get("_error_crops") or {}).get("hosvd")
    if crops is not None and len(crops):
        plot_errors(report["misclassified"]["hosvd"], crops, out_dir / "errors_hosvd.png")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return out_dir / "report.json"


def evaluation_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact evaluation block stored in a model file's manifest."""
    return {
        "folds": report["folds"],
        "images": report["images"],
        "groups": report["dataset"].get("groups"),
        "grouping": report.get("grouping"),
        "indeterminate_rate_mean": report["indeterminate_rate_mean"],
        "heads": {
            h: {
                k: s[k]
                for k in (
                    "accuracy_mean",
                    "accuracy_std",
                    "accuracy_pooled",
                    "accuracy_ci95",
                    "macro_f1_mean",
                    "macro_auc_mean",
                )
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
