"""Training-recipe sweep: named TrainingConfig variants x the 5 folds of ``evaluate``, in parallel.

Each job is one fold of one variant, run through the library's own ``fit_pipeline`` with the
same deterministic splits and per-fold seeds as ``leuk-fhir evaluate``, so a variant's mean is
what ``evaluate`` would report for it. Jobs run in worker processes (sharing a GPU when there
is one); results stream to a JSON-lines file; ``--deadline`` stops starting new jobs so the
sweep fits a fixed time (a GPU lease). Prints a mean +- std table per variant at the end.

Data: a folder (as ``evaluate`` reads it, at each variant's image size, whole images), or per
data key (an image size, optionally with a framing suffix: ``64c60`` = the central 60% of each
image at 64 px) an ``.npz`` of prepared crops (``images``, ``labels``; or ``data``/``lens``/
``labels`` holding losslessly encoded crops), which is how the sweep travelled to a lent GPU
(docs/model-measurements.md).

Usage (on the 2-core CPU one variant's five folds take about 15 minutes per 40 epochs):
    .venv/bin/python benchmarks/model_recipe_sweep.py --out benchmarks/results/sweep.jsonl \\
        --only base,e80 [--prepared 64=pbc64.npz] [--workers 7 --deadline 420]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PBC = REPO.parent / "shared" / "datasets" / "pbc"

#: name -> (task, data key, TrainingConfig overrides), in priority order. The data key is the
#: image size, optionally with a suffix naming how the crops were made ("64c60": the central
#: 60% of each image); ``--prepared KEY=NPZ`` supplies the crops. ``members`` (not a
#: TrainingConfig field) trains that many CNNs per fold (seeds fold, fold + 100, ...) and
#: scores their ensemble as well as member 0 alone.
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "base": ("8class", "64", {}),
    "c65": ("8class", "64c65", {}),
    "c65-wd05": ("8class", "64c65", {"weight_decay": 0.05}),
    "e80": ("8class", "64", {"epochs": 80}),
    "e160": ("8class", "64", {"epochs": 160}),
    "s96-e80": ("8class", "96", {"image_size": 96, "epochs": 80}),
    "wide-e80": ("8class", "64", {"epochs": 80, "widths": (24, 48, 96, 192)}),
    "bs128-e80": ("8class", "64", {"epochs": 80, "batch_size": 128, "learning_rate": 6e-3}),
    "ens3-e80": ("8class", "64", {"epochs": 80, "members": 3}),
    "c60": ("8class", "64c60", {}),
    "c60-e80": ("8class", "64c60", {"epochs": 80}),
    "c60-ens2": ("8class", "64c60", {"members": 2}),
    "c60-ens3": ("8class", "64c60", {"members": 3}),
    "c60-ens3-e80": ("8class", "64c60", {"epochs": 80, "members": 3}),
    "c65-ens2-e28": ("8class", "64c65", {"epochs": 28, "members": 2}),
    "binary-base": ("binary", "64", {}),
    "binary-e80": ("binary", "64", {"epochs": 80}),
}

_CACHE: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}


def _size(key: str) -> int:
    return int(key.split("c")[0])


def _load(source: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    if (source, size) not in _CACHE:
        path = Path(source)
        if path.suffix == ".npz":
            with np.load(path) as data:
                labels = data["labels"]
                if "images" in data:
                    images = data["images"]
                else:
                    from PIL import Image

                    ends = np.cumsum(data["lens"])
                    blob = data["data"]
                    images = np.stack(
                        [
                            np.asarray(
                                Image.open(io.BytesIO(blob[e - n : e].tobytes())).convert("RGB")
                            )
                            for e, n in zip(ends, data["lens"], strict=True)
                        ]
                    )
        else:
            from leuk_fhir.model.dataset import load_dataset

            dataset = load_dataset(path, size, max_pixels=64_000_000)
            images, labels = dataset.images, dataset.labels
        _CACHE[source, size] = (images, labels)
    return _CACHE[source, size]


def run_job(name: str, fold: int, source: str, threads: int) -> dict[str, Any]:
    """One fold of one variant; returns accuracies and timings."""
    import torch

    torch.set_num_threads(threads)
    from leuk_fhir.model.dataset import stratified_folds
    from leuk_fhir.model.evaluation import per_class_metrics
    from leuk_fhir.model.training import TrainingConfig, fit_pipeline

    task, key, overrides = VARIANTS[name]
    overrides = dict(overrides)
    members = int(overrides.pop("members", 1))
    images, labels = _load(source, _size(key))
    if task == "binary":
        labels = np.where(labels == "lymphocyte", "lymphocyte", "other")
    class_names, y = np.unique(labels, return_inverse=True)
    train, test = stratified_folds(labels, 5, seed=0)[fold]
    config = replace(TrainingConfig(**overrides), seed=fold)
    start = time.perf_counter()
    pipeline = fit_pipeline(images[train], y[train], tuple(class_names), config)
    heads = pipeline.predict_heads(images[test])
    if members > 1:
        heads = _ensemble(pipeline, heads, images[train], y[train], images[test], members)
    hosvd = heads["hosvd"]
    sensitivity = per_class_metrics(y[test], hosvd.predicted, hosvd.scores, len(class_names))[
        "sensitivity"
    ]
    return {
        "variant": name,
        "fold": fold + 1,
        "task": task,
        "accuracy": {h: float(np.mean(o.predicted == y[test])) for h, o in heads.items()},
        "hosvd_sensitivity": dict(zip(map(str, class_names), sensitivity, strict=True)),
        "hosvd": [
            pipeline.hosvd.channel_rank_,
            pipeline.hosvd.position_rank_,
            pipeline.hosvd.n_basis_,
            pipeline.hosvd.n_subspaces_,
        ],
        "epochs": pipeline.history.epochs,
        "precision": pipeline.history.precision,
        "device": str(pipeline.device),
        "seconds": {k: round(v, 1) for k, v in pipeline.seconds.items()},
        "wall_s": round(time.perf_counter() - start, 1),
    }


def _ensemble(
    first: Any,
    heads: dict[str, Any],
    train_images: np.ndarray,
    y: np.ndarray,
    test_images: np.ndarray,
    members: int,
) -> dict[str, Any]:
    """Heads of ``members`` CNNs: HOSVD on their stacked maps (each member's maps scaled to unit
    RMS on the training set), the mean of their HOSVD and softmax probabilities, an SVM on the
    stacked pooled maps; member 0's own heads are kept with a ``_m0`` suffix."""
    from leuk_fhir.model.hosvd import HOSVDClassifier
    from leuk_fhir.model.training import HeadOutput, fit_pipeline, pooled, svm_baseline

    pipes = [first] + [
        fit_pipeline(
            train_images,
            y,
            first.class_names,
            replace(first.config, seed=first.config.seed + 100 * m),
            with_svm=False,
        )
        for m in range(1, members)
    ]
    train_maps, test_maps, hosvd_p, soft_p = [], [], [], []
    for pipe in pipes:
        tr = pipe.features(train_images)[0]
        te, soft = pipe.features(test_images)
        scale = 1.0 / float(np.sqrt(np.mean(tr.astype(np.float64) ** 2)))
        train_maps.append(tr * scale)
        test_maps.append(te * scale)
        hosvd_p.append(pipe.hosvd.predict_proba(te))
        soft_p.append(soft)
    stacked_train = np.concatenate(train_maps, axis=1)
    stacked_test = np.concatenate(test_maps, axis=1)
    hosvd = HOSVDClassifier(cv=first.config.hosvd_cv, random_state=first.config.seed)
    proba = hosvd.fit(stacked_train, y).predict_proba(stacked_test)
    svm = svm_baseline(0)
    decision = np.asarray(svm.fit(pooled(stacked_train), y).decision_function(pooled(stacked_test)))
    out = {f"{h}_m0": o for h, o in heads.items()}
    mean_hosvd, mean_soft = np.mean(hosvd_p, axis=0), np.mean(soft_p, axis=0)
    out["hosvd"] = HeadOutput(proba.argmax(1), proba)
    out["hosvd_mean"] = HeadOutput(mean_hosvd.argmax(1), mean_hosvd)
    out["softmax"] = HeadOutput(mean_soft.argmax(1), mean_soft)
    out["svm"] = HeadOutput(decision.argmax(1), decision)
    for m in range(1, members):
        out[f"hosvd_m{m}"] = HeadOutput(hosvd_p[m].argmax(1), hosvd_p[m])
    return out


def summarise(records: list[dict[str, Any]]) -> str:
    lines = ["variant            folds  hosvd          softmax        svm            cnn s/fold"]
    for name in VARIANTS:
        rows = [r for r in records if r["variant"] == name]
        if not rows:
            continue
        cells = []
        for head in ("hosvd", "softmax", "svm"):
            acc = np.array([r["accuracy"][head] for r in rows]) * 100
            cells.append(f"{acc.mean():6.2f} +-{acc.std():4.2f}")
        cnn = np.mean([r["seconds"]["cnn"] for r in rows])
        lines.append(f"{name:18s} {len(rows):5d}  " + "  ".join(cells) + f"  {cnn:8.1f}")
        extra = sorted(set(rows[0]["accuracy"]) - {"hosvd", "softmax", "svm"})
        if extra:
            means = {h: 100 * np.mean([r["accuracy"][h] for r in rows]) for h in extra}
            lines.append(" " * 25 + "  ".join(f"{h} {v:.2f}" for h, v in means.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(PBC), help="class-folder tree (default: PBC)")
    parser.add_argument(
        "--prepared",
        action="append",
        default=[],
        metavar="KEY=NPZ",
        help="prepared crops for one data key (an image size, e.g. 64, or 64c60), used "
        "instead of decoding --data",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines results file")
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument(
        "--folds",
        default="1,2,3/4,5",
        help="folds to run, in passes separated by '/': every variant gets the first pass's "
        "folds before any gets the next (so a deadline leaves paired comparisons)",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--deadline", type=float, default=0, help="seconds; 0 = none")
    args = parser.parse_args()
    names = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    prepared = dict(item.split("=", 1) for item in args.prepared)
    jobs = []
    for folds in args.folds.split("/"):
        for name in names:
            source = prepared.get(VARIANTS[name][1], args.data)
            jobs += [(name, int(fold) - 1, source) for fold in folds.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (
        args.out.open("a") as sink,
        ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool,
    ):
        pending: set[Future[dict[str, Any]]] = set()
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < args.workers:
                if args.deadline and time.perf_counter() - start > args.deadline:
                    queue.clear()
                    break
                pending.add(pool.submit(run_job, *queue.pop(0), args.threads))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    record = future.result()
                except Exception as error:  # report and go on: one bad variant ends nothing
                    print(f"job failed: {error!r}", flush=True)
                    continue
                records.append(record)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                print(
                    f"[{time.perf_counter() - start:6.0f}s] {record['variant']} fold "
                    f"{record['fold']}: {record['accuracy']} {record['seconds']}",
                    flush=True,
                )
    print(summarise(records), flush=True)
    print(f"sweep wall {time.perf_counter() - start:.0f}s, {len(records)}/{len(jobs)} jobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
