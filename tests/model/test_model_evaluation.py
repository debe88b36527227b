"""Cross-validation: parallel folds equal in-process folds; every error is listed for review; an
interrupted run continues from the folds it kept."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from leuk_fhir.model import evaluation
from leuk_fhir.model.evaluation import cross_validate, plan_folds, write_report
from leuk_fhir.model.workflow import synthetic_dataset

from .conftest import TINY_CONFIG


def _predictions(report: dict) -> list:
    return [
        (
            f["fold"],
            {h: round(v["accuracy"], 12) for h, v in f["heads"].items()},
            f["hosvd_selection"],
        )
        for f in report["per_fold"]
    ]


def test_parallel_folds_match_in_process_folds(tmp_path: Path) -> None:
    ds = synthetic_dataset(9, seed=4, image_size=TINY_CONFIG.image_size, cell_size=64)
    serial = cross_validate(ds, 3, TINY_CONFIG, workers=1, threads=1)
    parallel = cross_validate(ds, 3, TINY_CONFIG, workers=2, threads=1, keep=tmp_path / "folds")
    # The parent process keeps each fold the workers finish.
    assert sorted(p.name for p in (tmp_path / "folds").iterdir()) == [
        "fold-1.npz",
        "fold-2.npz",
        "fold-3.npz",
    ]
    assert serial["parallel"] == {"workers": 1, "threads": 1}
    assert parallel["parallel"] == {"workers": 2, "threads": 1}
    assert [f["fold"] for f in parallel["per_fold"]] == [1, 2, 3]  # in fold order, not finish order
    assert _predictions(parallel) == _predictions(serial)
    for head in ("hosvd", "softmax", "svm"):
        assert (
            parallel["heads"][head]["confusion_matrix"] == serial["heads"][head]["confusion_matrix"]
        )
        assert np.allclose(parallel["_roc"][head]["scores"], serial["_roc"][head]["scores"])


def test_fold_plan_uses_the_cores_and_the_memory_there_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(evaluation, "available_memory", lambda: 64 << 30)
    # Two cores: one fold at a time (two one-thread workers were slower there).
    monkeypatch.setattr(evaluation, "available_cores", lambda: 2)
    assert plan_folds(5, train_images=3200, epochs=40, data_bytes=50 << 20).workers == 1
    # Sixteen cores: a fold per two cores, up to the number of folds, threads shared out.
    monkeypatch.setattr(evaluation, "available_cores", lambda: 16)
    assert plan_folds(5, 3200, 40, 50 << 20) == evaluation.FoldPlan(5, 3)
    assert plan_folds(10, 3200, 40, 50 << 20) == evaluation.FoldPlan(8, 2)
    # Too little work to pay for starting processes: in-process, threads left alone.
    assert plan_folds(5, train_images=40, epochs=30, data_bytes=1 << 20) == evaluation.FoldPlan(
        1, 0
    )
    # Never more workers than folds; an explicit count wins over auto.
    assert plan_folds(2, 3200, 40, 50 << 20, workers=8).workers == 2
    assert plan_folds(5, 3200, 40, 50 << 20, workers=1) == evaluation.FoldPlan(1, 0)
    monkeypatch.setattr(evaluation, "available_cores", lambda: 2)
    assert plan_folds(5, 3200, 40, 50 << 20, workers=2) == evaluation.FoldPlan(2, 1)
    # A data set that fits memory once but not twice over runs one fold at a time.
    monkeypatch.setattr(evaluation, "available_cores", lambda: 16)
    monkeypatch.setattr(evaluation, "available_memory", lambda: 12 << 30)
    assert plan_folds(5, 17_000, 20, data_bytes=5 << 30).workers == 1
    assert plan_folds(5, 17_000, 20, data_bytes=1 << 30).workers == 3
    with pytest.raises(ValueError):
        plan_folds(5, 3200, 40, 1, workers=-1)


def test_every_error_is_listed_for_review_with_a_contact_sheet(tmp_path: Path) -> None:
    ds = synthetic_dataset(8, seed=6, image_size=TINY_CONFIG.image_size, cell_size=64)
    # Labels shuffled: the CNN cannot learn them, so every head makes errors to list.
    shuffled = replace(ds, labels=np.random.default_rng(0).permutation(ds.labels))
    report = cross_validate(shuffled, 2, TINY_CONFIG, workers=1)
    for head, listed in report["misclassified"].items():
        cm = np.array(report["heads"][head]["confusion_matrix"])
        assert len(listed) == cm.sum() - np.trace(cm) > 0
        assert all(e["true"] != e["predicted"] for e in listed)
        assert [e["score"] for e in listed] == sorted((e["score"] for e in listed), reverse=True)
        truth = dict(zip(shuffled.paths, shuffled.labels, strict=True))
        assert all(truth[e["path"]] == e["true"] for e in listed)
    write_report(report, tmp_path)
    assert (tmp_path / "errors_hosvd.png").stat().st_size > 1000
    markdown = (tmp_path / "report.md").read_text()
    assert "Misclassified cells, HOSVD head" in markdown and "errors_hosvd.png" in markdown
    assert "misclassified" in json.loads((tmp_path / "report.json").read_text())


def test_a_worker_killed_mid_run_stops_with_a_typed_error() -> None:
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from leuk_fhir.errors import ResourceExhaustedError

    ds = synthetic_dataset(8, seed=7, image_size=TINY_CONFIG.image_size, cell_size=64)
    killed: list[int] = []

    def kill_a_worker() -> None:  # what the kernel's OOM killer does to a worker
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for child in multiprocessing.active_children():
                if child.pid:
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    with pytest.raises(ResourceExhaustedError, match="worker process died") as error:
        cross_validate(ds, 2, replace(TINY_CONFIG, epochs=200), workers=2, threads=1)
    killer.join()
    assert killed and "--workers 1" in str(error.value)


def test_an_interrupted_run_continues_from_the_folds_it_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from leuk_fhir.model.fold_store import FoldStore

    ds = synthetic_dataset(9, seed=4, image_size=TINY_CONFIG.image_size, cell_size=64)
    uninterrupted = cross_validate(ds, 3, TINY_CONFIG, workers=1)
    keep = tmp_path / "folds"
    cross_validate(ds, 3, TINY_CONFIG, workers=1, keep=keep)
    assert sorted(p.name for p in keep.iterdir()) == ["fold-1.npz", "fold-2.npz", "fold-3.npz"]
    # A run that stopped after its first fold: only fold 1 is on disk. Mark its record, so the
    # resumed report shows whether it was read back rather than trained again.
    (keep / "fold-2.npz").unlink()
    (keep / "fold-3.npz").unlink()
    with np.load(keep / "fold-1.npz", allow_pickle=False) as data:
        kept = {name: data[name] for name in data.files}
    record = json.loads(str(kept["record"]))
    record["seconds_train"] = 12345.0
    kept["record"] = np.array(json.dumps(record))
    np.savez(keep / "fold-1.npz", **kept)
    resumed = cross_validate(ds, 3, TINY_CONFIG, workers=1, keep=keep, progress=True)
    assert resumed["resumed_folds"] == [1]
    assert resumed["per_fold"][0]["seconds_train"] == 12345.0
    assert "fold 1/3: hosvd" in capsys.readouterr().err
    # Everything else is the report the uninterrupted run wrote.
    assert _predictions(resumed) == _predictions(uninterrupted)
    assert resumed["misclassified"] == uninterrupted["misclassified"]
    for head in ("hosvd", "softmax", "svm"):
        assert np.array_equal(
            resumed["_roc"][head]["scores"], uninterrupted["_roc"][head]["scores"]
        )
    write_report(resumed, tmp_path / "report")
    assert "Fold(s) 1 were kept from an earlier" in (tmp_path / "report" / "report.md").read_text()

    # Other settings are another run: nothing is reused, and its own folds replace the files.
    other = cross_validate(ds, 3, replace(TINY_CONFIG, epochs=2), workers=1, keep=keep)
    assert other["resumed_folds"] == []
    assert cross_validate(ds, 3, replace(TINY_CONFIG, epochs=2), workers=1, keep=keep)[
        "resumed_folds"
    ] == [1, 2, 3]
    # A truncated file is set aside with a note and its fold trained again; no error.
    (keep / "fold-2.npz").write_bytes((keep / "fold-2.npz").read_bytes()[:100])
    again = cross_validate(
        ds, 3, replace(TINY_CONFIG, epochs=2), workers=1, keep=keep, progress=True
    )
    assert again["resumed_folds"] == [1, 3]
    assert "fold-2.npz cannot be read" in capsys.readouterr().err
    assert _predictions(again) == _predictions(other)
    # A file of this run whose arrays do not fit the fold is not used either.
    with np.load(keep / "fold-1.npz", allow_pickle=False) as data:
        store = FoldStore(keep, str(data["identity"]))
    test_size = again["per_fold"][0]["test_images"]
    assert store.load(0, test_size, 2)[0] is not None
    outcome, note = store.load(0, test_size + 1, 2)
    assert outcome is None and note is not None and "does not fit fold 1" in note


def test_a_folder_that_cannot_keep_folds_costs_the_resume_not_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = synthetic_dataset(8, seed=6, image_size=TINY_CONFIG.image_size, cell_size=64)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    report = cross_validate(ds, 2, TINY_CONFIG, workers=1, keep=blocked / "folds")
    assert [f["fold"] for f in report["per_fold"]] == [1, 2] and report["resumed_folds"] == []
    err = capsys.readouterr().err
    assert err.count("cannot keep fold 1 in") == 1 and "cannot keep fold 2" not in err
