"""The model commands end to end: train, evaluate, predict, model-card (tiny settings)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from leuk_fhir.cli import main
from leuk_fhir.model.machine import machine_text


@pytest.fixture(scope="module")
def trained(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model.lfm"
    assert (
        main(
            [
                "train",
                str(synthetic_folder),
                "--out",
                str(out),
                "--epochs",
                "3",
                "--image-size",
                "32",
                "--seed",
                "1",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    return out


def test_train_records_the_precision_it_used(trained: Path) -> None:
    from leuk_fhir.model.artifact import read_artifact

    manifest = read_artifact(trained).manifest
    assert manifest["training"]["config"]["precision"] == "fp32"
    assert manifest["training"]["history"]["precision"] == "float32"
    # Synthetic cells fill their images: auto framing measures that and keeps them whole.
    framing = manifest["training"]["data"]["framing"]
    assert framing["method"] == "auto" and framing["extent_quantile"] > 0.85
    assert manifest["preprocessing"]["crop"] == framing["crop"] == 1.0


def test_train_then_predict_json(
    trained: Path, synthetic_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    images = (
        sorted((synthetic_folder / "blast").glob("*.png"))[:2]
        + sorted((synthetic_folder / "normal").glob("*.png"))[:2]
    )
    assert main(["predict", *map(str, images), "--model", str(trained), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["name"] == "leuk-fhir-cnn-hosvd" and not out["model"]["is_demo"]
    assert len(out["results"]) == 4
    for r in out["results"]:
        assert set(r) >= {"label", "probabilities", "residuals", "indeterminate"}
        assert set(r["probabilities"]) == {"blast", "normal"}
    assert [r["label"] for r in out["results"]].count("blast") >= 1


def test_predict_defaults_to_the_demo_model(
    synthetic_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = next((synthetic_folder / "blast").glob("*.png"))
    assert main(["predict", str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["is_demo"] is True
    assert out["results"][0]["label"] in ("blast", "normal", "indeterminate")


@pytest.fixture(scope="module")
def other_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labelled cells the ``trained`` model never saw (another seed and image size)."""
    from leuk_fhir.model.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("other") / "cells", per_class=30, seed=77, size=120
    )


def test_validate_scores_the_model_as_predict_does(
    trained: Path, other_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    from leuk_fhir.model.classifier import load_classifier
    from leuk_fhir.model.images import decode_image

    out = tmp_path / "val"
    assert main(["validate", str(other_site), "--model", str(trained), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "hosvd    accuracy" in printed.out and "WARNING" not in printed.err
    report = json.loads((out / "report.json").read_text())
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == report["images"] == 60 and not report["same_data_as_training"]
    for name in ("report.md", "confusion_matrix.png", "roc.png"):
        assert (out / name).stat().st_size > 0

    # Every answer is the one `predict` (the deployed path: decode, frame, resize) gives.
    images = [decode_image(Path(r["path"]), 64_000_000) for r in rows]
    findings = load_classifier(trained).classify(images)
    for row, finding in zip(rows, findings, strict=True):
        assert bool(int(row["indeterminate"])) == finding.indeterminate
        if not finding.indeterminate:
            assert row["hosvd"] == finding.label
        assert float(row["hosvd_probability"]) == pytest.approx(
            finding.probabilities[row["hosvd"]], abs=1e-4
        )

    # The figures are those of the rows.
    for head in ("hosvd", "softmax"):
        right = sum(r["true"] == r[head] for r in rows)
        assert report["heads"][head]["accuracy"] == pytest.approx(right / len(rows))
        matrix = report["heads"][head]["confusion_matrix"]
        assert sum(map(sum, matrix)) == 60 and sum(matrix[i][i] for i in range(2)) == right
        wrong = [r["path"] for r in rows if r["true"] != r[head]]
        assert sorted(e["path"] for e in report["misclassified"][head]) == sorted(wrong)
    answered = [r for r in rows if r["indeterminate"] == "0"]
    assert report["indeterminate_rate"] == pytest.approx(1 - len(answered) / len(rows))
    if answered:
        right = sum(r["true"] == r["hosvd"] for r in answered) / len(answered)
        assert report["heads"]["hosvd"]["answered_accuracy"] == pytest.approx(right)
    only_hosvd = sum(r["true"] == r["hosvd"] != r["softmax"] for r in rows)
    only_softmax = sum(r["true"] == r["softmax"] != r["hosvd"] for r in rows)
    (comparison,) = report["head_comparisons"]
    assert (comparison["only_a"], comparison["only_b"]) == (only_hosvd, only_softmax)
    assert report["model"]["sha256"] == load_classifier(trained).info.sha256
    assert "not recorded (train with --cv-folds K)" in (out / "report.md").read_text()


def test_validate_on_one_class_and_on_training_images(
    trained: Path,
    synthetic_folder: Path,
    other_site: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    # A folder of blasts only (a sensitivity study) is scored; the model's other class is n/a.
    blasts = tmp_path / "blasts"
    shutil.copytree(other_site / "blast", blasts / "BLAST")  # names match without case
    args = ["validate", str(blasts), "--model", str(trained), "--out", str(tmp_path / "b")]
    assert main(args) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["classes_without_images"] == ["normal"] and report["images"] == 30
    per_class = report["heads"]["hosvd"]["per_class"]
    assert per_class["normal"]["sensitivity"] is None and per_class["blast"]["auc"] is None
    assert per_class["blast"]["sensitivity"] == pytest.approx(report["heads"]["hosvd"]["accuracy"])

    # The model's own training images are flagged: that would be training accuracy.
    capsys.readouterr()
    args = ["validate", str(synthetic_folder), "--model", str(trained), "--out"]
    assert main([*args, str(tmp_path / "t")]) == 0
    assert "these are the images the model was trained on" in capsys.readouterr().err
    assert json.loads((tmp_path / "t" / "report.json").read_text())["same_data_as_training"]
    assert (
        "**These are the images the model was trained on**"
        in (tmp_path / "t" / "report.md").read_text()
    )


def test_validate_refuses_a_class_the_model_does_not_know(
    trained: Path, other_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(other_site / "blast", data / "blast")
    shutil.copytree(other_site / "normal", data / "monocyte")
    capsys.readouterr()
    code = main(["validate", str(data), "--model", str(trained), "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code != 0 and not (tmp_path / "v").exists()
    assert "['monocyte'] that the model does not know; its classes are ['blast', 'normal']" in err


def test_validate_gives_per_patient_figures(
    trained: Path, other_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    from collections import Counter

    # A manifest naming each cell's patient: three patients of each class, ten cells each.
    manifest = tmp_path / "cells.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        for label in ("blast", "normal"):
            for i, path in enumerate(sorted((other_site / label).glob("*.png"))):
                writer.writerow([path, label, f"{label[0].upper()}{i // 10}"])
    out = tmp_path / "v"
    assert main(["validate", str(manifest), "--model", str(trained), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    patients = report["patients"]
    assert patients["count"] == 6 and patients["grouping"] == "the manifest's group column"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    group_of = {str(Path(r[0])): r[2] for r in csv.reader(manifest.open())}  # path -> patient
    for patient in patients["rows"]:
        mine = [r for r in rows if group_of[str(Path(r["path"]))] == patient["patient"]]
        answers = Counter(r["hosvd"] for r in mine if r["indeterminate"] == "0")
        assert patient["cells"] == len(mine) == 10 and not patient["mixed_labels"]
        assert patient["answers"] == dict(answers)
        assert patient["answer"] == answers.most_common(1)[0][0]
        assert patient["right"] == (patient["answer"] == patient["true"])
    right = sum(p["right"] for p in patients["rows"])
    assert patients["accuracy"] == pytest.approx(right / 6)
    assert "## Per patient (HOSVD head)" in (out / "report.md").read_text()

    # Patients named by a pattern over the paths; here each holds cells of both classes.
    args = ["validate", str(other_site), "--model", str(trained), "--out", str(tmp_path / "p")]
    assert main([*args, "--group-pattern", r"_00(\d)\d\.png$"]) == 0
    patients = json.loads((tmp_path / "p" / "report.json").read_text())["patients"]
    assert [p["patient"] for p in patients["rows"]] == ["0", "1", "2"]
    assert all(p["mixed_labels"] and p["cells"] == 20 for p in patients["rows"])
    assert main(args) == 0  # no groups: no per-patient figures
    assert json.loads((tmp_path / "p" / "report.json").read_text())["patients"] is None


def test_validate_a_two_class_model_on_more_classes(
    other_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data = tmp_path / "three"
    for source, name in (("blast", "blast"), ("normal", "lymphocyte"), ("normal", "monocyte")):
        shutil.copytree(other_site / source, data / name)
    model = tmp_path / "blast-vs-other.lfm"
    train = ["train", str(data), "--binary-positive", "blast", "--epochs", "3"]
    assert main([*train, "--image-size", "32", "--out", str(model)]) == 0
    capsys.readouterr()
    args = ["validate", str(data), "--model", str(model), "--out", str(tmp_path / "v")]
    # As two classes, lymphocyte/ and monocyte/ hold the same files under two labels: every
    # copy is left out, which empties both (merged into 'other', they are plain duplicates).
    assert main(args) != 0
    assert "class 'lymphocyte' has no images left" in capsys.readouterr().err
    assert main([*args, "--binary-positive", "blast"]) == 0
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    # monocyte/ holds copies of lymphocyte/: dropped as byte-identical duplicates
    assert report["dataset"]["classes"] == {"blast": 30, "other": 30}
    assert report["dataset"]["duplicates_dropped"] == 30
    assert report["same_data_as_training"]  # relabelled the same way as for training


def test_model_card_command(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model-card"]) == 0
    assert "NOT FOR CLINICAL USE" in capsys.readouterr().out
    card = tmp_path / "card.md"
    assert main(["model-card", "--model", str(trained), "--out", str(card)]) == 0
    text = card.read_text()
    assert (
        "leuk-fhir-cnn-hosvd" in text
        and "NOT FOR CLINICAL USE" not in text
        and "Training data" in text
    )
    # ... and where and how long its CNN trained
    assert re.search(r"augmentation; the CNN trained in \d+ s on .+, \d+ (CPU )?cores", text)


def test_evaluate_writes_reports_for_three_heads(
    synthetic_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(synthetic_folder),
                "--folds",
                "2",
                "--epochs",
                "2",
                "--image-size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert set(report["heads"]) == {"hosvd", "softmax", "svm"}
    for head in report["heads"].values():
        assert 0.0 <= head["accuracy_mean"] <= 1.0 and "accuracy_std" in head
        for metrics in head["per_class"].values():
            assert set(metrics) == {"sensitivity", "specificity", "precision", "f1", "auc"}
    assert len(report["per_fold"]) == 2
    assert report["heads"]["hosvd"]["accuracy_mean"] >= 0.9
    assert report["config"]["crop"] == report["dataset"]["framing"]["crop"] == 1.0
    markdown = (out / "report.md").read_text()
    assert "framing: whole image" in markdown
    # The wall time names the machine and the arithmetic it came from.
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"]
    precision = report["per_fold"][0]["precision"]
    assert f"in total on {machine_text(machine)}, CNNs" in markdown
    assert f"CNNs trained in {precision}." in markdown
    # Before training it says what trains on which machine; each fold's result as it ends.
    printed = capsys.readouterr()
    err = printed.err
    assert f"CNN training in {precision} on {machine_text(machine)}" in err
    for fold in report["per_fold"]:
        accuracy = 100 * fold["heads"]["hosvd"]["accuracy"]
        assert f"fold {fold['fold']}/2: hosvd {accuracy:.2f}%" in err
    assert "confusion_matrix.png" in markdown and "roc.png" in markdown
    assert (out / "confusion_matrix.png").stat().st_size > 1000 and (
        out / "roc.png"
    ).stat().st_size > 1000
    # Every cell is held out once: the pooled share and its interval, and the heads compared
    # cell by cell, agree with the list of misclassified cells.
    wrong = {h: {e["path"] for e in report["misclassified"][h]} for h in report["heads"]}
    for name, head in report["heads"].items():
        assert head["accuracy_pooled"] == pytest.approx(1 - len(wrong[name]) / 48)
        low, high = head["accuracy_ci95"]
        assert low <= head["accuracy_pooled"] <= high and high - low > 0.01
    for comparison in report["head_comparisons"]:
        a, b = wrong[comparison["a"]], wrong[comparison["b"]]
        assert (comparison["only_a"], comparison["only_b"]) == (len(b - a), len(a - b))
        assert 0.0 <= comparison["p_value"] <= 1.0
    assert [(c["a"], c["b"]) for c in report["head_comparisons"]] == [
        ("hosvd", "softmax"),
        ("hosvd", "svm"),
    ]
    assert "McNemar exact p = " in markdown and "95% CI" in printed.out


def test_bad_input_gives_one_line_and_an_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["predict", str(broken)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("leuk-fhir: error:") and "broken.jpg" in err and "\n" not in err
    single = tmp_path / "single" / "blast"
    single.mkdir(parents=True)
    (single / "a.png").write_bytes((tmp_path / "broken.jpg").read_bytes())
    assert main(["train", str(tmp_path / "single"), "--out", str(tmp_path / "m.lfm")]) == 3
    for crop in ("0", "1.2", "tight"):
        assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "e"), "--crop", crop]) == 3
        assert "--crop must be 'auto' or a fraction" in capsys.readouterr().err
    bad_model = tmp_path / "bad.lfm"
    bad_model.write_bytes(b"PK\x03\x04 truncated")
    assert main(["model-card", "--model", str(bad_model)]) == 4


def test_evaluate_splits_by_patient(tmp_path: Path) -> None:
    from PIL import Image

    from leuk_fhir.model.synthetic import generate_cell

    data = tmp_path / "data"
    for p in range(8):
        kind = ("normal", "blast")[p % 2]
        for j in range(6):
            target = data / kind / f"patient{p}" / f"cell{j}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(generate_cell(kind, 100 * p + j, 64)).save(target)
    out = tmp_path / "eval"
    args = ["evaluate", str(data), "--folds", "2", "--epochs", "2", "--image-size", "32"]
    assert main([*args, "--group-pattern", "^[^/]+/([^/]+)/", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["grouped"] and report["dataset"]["groups"] == 8
    tested = [set(f["test_groups"]) for f in report["per_fold"]]
    assert not tested[0] & tested[1] and tested[0] | tested[1] == {f"patient{p}" for p in range(8)}
    # Each training half holds two patients per class: the HOSVD head's inner CV is grouped too.
    assert all(f["hosvd_selection"]["inner_cv_grouped"] for f in report["per_fold"])
    assert "by patient (8 groups from --group-pattern" in (out / "report.md").read_text()
    # Cells flagged out of focus are a part of those answered indeterminate.
    assert all(0.0 <= f["out_of_focus_rate"] <= f["indeterminate_rate"] for f in report["per_fold"])
    # A pattern that misses images is one clear line and exit code 3, before any training.
    assert main([*args, "--group-pattern", "nomatch(\\d)", "--out", str(tmp_path / "x")]) == 3


def _stop_once_kept(args: list[str], kept: Path, stop: int, sigint_ignored: bool = False) -> str:
    """Run ``leuk-fhir ARGS`` in a child process and send it the real signal ``stop`` as soon as
    the file ``kept`` (its first finished fold) appears; returns its stderr. With
    ``sigint_ignored`` the child starts with SIGINT ignored, as a job started with ``&`` from a
    shell script does."""
    import subprocess
    import sys
    import time

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    run = subprocess.Popen(
        [sys.executable, "-m", "leuk_fhir", *args],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint if sigint_ignored else None,
    )
    deadline = time.monotonic() + 300
    while not kept.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(stop)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert f"kept in {kept.parent}; the same command continues from there" in err
    return err


def test_evaluate_stopped_by_ctrl_c_continues_where_it_stopped(
    synthetic_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "eval"
    args = ["evaluate", str(synthetic_folder), "--folds", "3", "--epochs", "20"]
    args += ["--image-size", "32", "--out", str(out)]
    first = out / "folds" / "fold-1.npz"
    # Ctrl-C reaches it even when started in the background from a script (SIGINT ignored).
    _stop_once_kept(args, first, signal.SIGINT, sigint_ignored=True)
    assert not (out / "report.json").exists()
    saved = tmp_path / "fold-1.npz"
    shutil.copy(first, saved)

    # The same command continues: the kept fold is not trained again.
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "fold 1/3: hosvd" in err and "kept from an earlier run" in err
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_folds"][0] == 1 and len(report["per_fold"]) == 3
    assert "were kept from an earlier, interrupted run" in (out / "report.md").read_text()
    assert not (out / "folds").exists()  # the report holds them now

    # --fresh trains every fold again, whatever an earlier run kept.
    (out / "folds").mkdir()
    shutil.copy(saved, out / "folds" / "fold-1.npz")
    assert main([*args, "--fresh"]) == 0
    assert "kept from an earlier run" not in capsys.readouterr().err
    fresh = json.loads((out / "report.json").read_text())
    assert fresh["resumed_folds"] == []
    assert [f["heads"] for f in fresh["per_fold"]] == [f["heads"] for f in report["per_fold"]]


def _alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _worker_pids(parent: int) -> list[int]:
    """Live multiprocessing spawn workers whose parent is process ``parent``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if ppid == parent and b"spawn_main" in cmdline and _alive(pid):
            pids.append(pid)
    return pids


def test_evaluate_stopped_ends_its_fold_workers(synthetic_folder: Path, tmp_path: Path) -> None:
    """SIGTERM to an `evaluate --workers 2` ends it at once, workers included, rather than
    waiting for (or orphaning) the folds in progress."""
    import subprocess
    import sys
    import time

    args = ["evaluate", str(synthetic_folder), "--folds", "3", "--workers", "2"]
    args += ["--epochs", "5000", "--image-size", "32", "--out", str(tmp_path / "eval")]
    run = subprocess.Popen(
        [sys.executable, "-m", "leuk_fhir", *args], stderr=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers := _worker_pids(run.pid)) < 2 and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()[1]
            time.sleep(0.05)
        assert len(workers) == 2
        time.sleep(3)  # into training
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)  # a fold of 5,000 epochs takes minutes
        assert run.returncode == 130, err
        assert "interrupted" in err
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:  # a failed run leaves nothing training behind it
        run.kill()
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)


def test_train_with_cv_folds_stopped_by_sigterm_continues(
    synthetic_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from leuk_fhir.model.artifact import read_artifact

    out = tmp_path / "m.lfm"
    args = ["train", str(synthetic_folder), "--cv-folds", "3", "--epochs", "20"]
    args += ["--image-size", "32", "--out", str(out)]
    # SIGTERM, as a batch scheduler sends at its time limit, stops it as Ctrl-C does.
    _stop_once_kept(args, tmp_path / "m.lfm.folds" / "fold-1.npz", signal.SIGTERM)
    assert not out.exists()
    assert main(args) == 0
    assert "kept from an earlier run" in capsys.readouterr().err
    evaluation = read_artifact(out).manifest["evaluation"]
    assert evaluation["folds"] == 3 and set(evaluation["heads"]) == {"hosvd", "softmax", "svm"}
    assert not (tmp_path / "m.lfm.folds").exists()
    # The model card shows each head's figure over all held-out cells with its interval.
    low, high = evaluation["heads"]["hosvd"]["accuracy_ci95"]
    assert main(["model-card", "--model", str(out)]) == 0
    card = capsys.readouterr().out
    assert "All held-out cells (95% CI)" in card and f"{100 * high:.2f}%)" in card
    assert main(["model-card"]) == 0  # the demo model's file predates the interval
    assert "All held-out cells" not in capsys.readouterr().out


def test_evaluate_stopped_inside_a_fold_continues_its_cnn(
    synthetic_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", str(synthetic_folder), "--folds", "2", "--epochs", "30"]
    args += ["--image-size", "32", "--out", str(out)]
    # Stopped as soon as fold 1's CNN has kept its first epoch, long before the fold ends.
    err = _stop_once_kept(args, out / "folds" / "fold-1.cnn.pt", signal.SIGTERM)
    assert "1 partly trained CNN(s) kept in" in err
    assert not (out / "folds" / "fold-1.npz").exists()

    assert main(args) == 0
    assert "fold 1/2: its CNN continues from epoch " in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_folds"] == [] and list(report["continued_folds"]) == ["1"]
    assert "The CNN of fold(s) 1 (from epoch" in (out / "report.md").read_text()
    assert not (out / "folds").exists()

    # The continued fold is the fold an uninterrupted run trains.
    assert main([*args, "--fresh"]) == 0
    fresh = json.loads((out / "report.json").read_text())
    assert fresh["continued_folds"] == {}
    assert [f["heads"] for f in fresh["per_fold"]] == [f["heads"] for f in report["per_fold"]]


def test_train_stopped_in_its_final_fit_continues_it(
    synthetic_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from leuk_fhir.model.artifact import read_artifact

    def args(out: Path) -> list[str]:
        options = ["--epochs", "40", "--image-size", "32", "--out", str(out)]
        return ["train", str(synthetic_folder), *options]

    out = tmp_path / "m.lfm"
    err = _stop_once_kept(args(out), tmp_path / "m.lfm.folds" / "final.cnn.pt", signal.SIGINT)
    assert "1 partly trained CNN(s) kept in" in err and not out.exists()

    assert main(args(out)) == 0
    assert "the CNN trained on all images continues from epoch " in capsys.readouterr().err
    assert not (tmp_path / "m.lfm.folds").exists()
    assert main(args(tmp_path / "uninterrupted.lfm")) == 0
    resumed = read_artifact(out).cnn_state
    uninterrupted = read_artifact(tmp_path / "uninterrupted.lfm").cnn_state
    assert resumed.keys() == uninterrupted.keys()
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in resumed)
