"""The model commands on imperfect researcher data: every problem is one clear line (exit
code 3 or 4) before any training, and files left out are reported, never silently dropped."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from leuk_fhir.cli import main
from leuk_fhir.errors import DatasetError

FAST = ["--epochs", "1", "--image-size", "16", "--crop", "1"]


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    printed = capsys.readouterr().err
    err = printed.strip().splitlines()[-1]  # after progress bars and notes, if any
    assert err.startswith("leuk-fhir: error:") and "Traceback" not in printed
    for needle in needles:
        assert needle in err, err
    return err


def _small(synthetic_folder: Path, root: Path, blasts: int, normals: int = 12) -> Path:
    for name, count in (("blast", blasts), ("normal", normals)):
        (root / name).mkdir(parents=True)
        for path in sorted((synthetic_folder / name).glob("*.png"))[:count]:
            shutil.copy(path, root / name / path.name)
    return root


def test_an_out_that_cannot_be_written_fails_before_training(
    synthetic_folder: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    data = str(synthetic_folder)
    assert main(["train", data, "--out", str(tmp_path / "adir"), *FAST]) == 3
    _one_line_error(capsys, "adir is a folder; give a file name inside it")
    assert main(["train", data, "--out", str(tmp_path / "afile" / "m.lfm"), *FAST]) == 3
    _one_line_error(capsys, "afile is a file, not a folder")
    assert main(["evaluate", data, "--out", str(tmp_path / "afile"), *FAST]) == 3
    _one_line_error(capsys, "afile is a file, not a folder")
    model = ["--model", str(tiny_model)]
    assert main(["validate", data, *model, "--out", str(tmp_path / "afile" / "v")]) == 3
    _one_line_error(capsys, "afile is a file, not a folder")
    assert main(["model-card", *model, "--out", str(tmp_path / "adir")]) == 3
    _one_line_error(capsys, "is a folder")
    # nothing was trained or left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert not list((tmp_path / "adir").iterdir())
    # model-card makes a missing folder, as train does
    assert main(["model-card", *model, "--out", str(tmp_path / "new" / "card.md")]) == 0
    assert "Model card" in (tmp_path / "new" / "card.md").read_text()


def test_an_out_in_a_read_only_folder_fails_before_training(
    synthetic_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tempfile

    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes into read-only folders: refuse as the kernel would

        def refused(**_: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    try:
        assert main(["train", str(synthetic_folder), "--out", str(locked / "m.lfm"), *FAST]) == 3
        _one_line_error(capsys, "cannot write --out", "Permission denied")
    finally:
        locked.chmod(0o700)
    assert not list(locked.iterdir())


def test_fold_counts_are_checked_and_name_their_flag(
    synthetic_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "m.lfm")
    for folds in ("1", "-2"):
        assert main(["train", str(synthetic_folder), "--out", out, "--cv-folds", folds]) == 3
        _one_line_error(capsys, f"--cv-folds must be 0 (none) or at least 2, not {folds}")
    assert main(["evaluate", str(synthetic_folder), "--out", out, "--folds", "1"]) == 3
    _one_line_error(capsys, "--folds must be at least 2, not 1")


def test_a_class_too_small_for_the_hosvd_head_fails_before_training(
    synthetic_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _small(synthetic_folder, tmp_path / "one", blasts=1)
    assert main(["train", str(one), "--out", str(tmp_path / "one.lfm"), *FAST]) == 3
    err = _one_line_error(capsys, "class 'blast' has 1 image; training needs at least 2")
    assert "CNN training" not in err
    few = _small(synthetic_folder, tmp_path / "few", blasts=3)
    out = tmp_path / "ev"
    assert main(["evaluate", str(few), "--folds", "2", "--out", str(out), *FAST]) == 3
    _one_line_error(capsys, "class 'blast' has 3 image(s), fewer than the 4 that 2 folds need")
    args = ["train", str(few), "--cv-folds", "2", "--out", str(tmp_path / "few.lfm"), *FAST]
    assert main(args) == 3
    _one_line_error(capsys, "fewer than the 4 that 2 folds need")
    assert not out.exists() and not (tmp_path / "few.lfm.folds").exists()


def test_validate_reports_skipped_files_and_conflicting_copies(
    synthetic_folder: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _small(synthetic_folder, tmp_path / "data", blasts=6, normals=6)
    first = sorted((data / "blast").glob("*.png"))[0]
    shutil.copy(first, data / "normal" / "mislabelled.png")
    shutil.copy(first, data / "stray.png")
    (data / "normal" / ".thumbnails").mkdir()
    shutil.copy(first, data / "normal" / ".thumbnails" / "t.png")
    out = tmp_path / "v"
    capsys.readouterr()
    assert main(["validate", str(data), "--model", str(tiny_model), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (
        "skipped 2 file(s) or folder(s): 1 image outside class folders, 1 hidden or system "
        "folder (e.g. stray.png, normal/.thumbnails)" in err
    )
    assert (
        f"left out 1 image(s) whose byte-identical copies carry different labels (2 files): "
        f"{first} (blast) = {data / 'normal' / 'mislabelled.png'} (normal)" in err
    )
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["classes"] == {"blast": 5, "normal": 6}
    assert report["dataset"]["duplicate_label_conflicts"] == 1
    assert report["dataset"]["skipped_files"] == 2
    markdown = (out / "report.md").read_text()
    assert "1 image(s) left out because byte-identical copies carry different labels" in markdown
    assert "2 file(s) or folder(s) skipped" in markdown


def test_validate_never_merges_or_relabels_case_variant_classes(
    synthetic_folder: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from leuk_fhir.model.validation import match_classes

    data = _small(synthetic_folder, tmp_path / "data", blasts=4, normals=4)
    shutil.copytree(data / "normal", data / "BLAST")
    args = ["validate", str(data), "--model", str(tiny_model), "--out", str(tmp_path / "v")]
    assert main(args) == 3
    _one_line_error(capsys, "classes 'BLAST' and 'blast' differ only in case")
    # A model that (from an older leuk-fhir) has case-variant classes: exact names first.
    model = ("ALL", "all", "normal")
    assert match_classes(model, ("ALL", "all", "normal")).tolist() == [0, 1, 2]
    assert match_classes(model, ("NORMAL",)).tolist() == [2]
    with pytest.raises(DatasetError, match="'All' could be any of the model's classes"):
        match_classes(model, ("All",))
    with pytest.raises(DatasetError, match="would all be scored as the model's 'normal'"):
        match_classes(("normal", "blast"), ("Normal", "NORMAL"))


def test_a_never_predicted_class_has_no_precision() -> None:
    from leuk_fhir.model.evaluation import per_class_lines, per_class_metrics

    y = np.array([0, 0, 0, 1])
    metrics = per_class_metrics(y, np.array([0, 0, 0, 0]), np.eye(2)[[0, 0, 0, 0]], 2)
    assert metrics["precision"] == [0.75, None]
    per_class = {"a": {k: v[0] for k, v in metrics.items()}}
    per_class["b"] = {k: v[1] for k, v in metrics.items()}
    assert "| hosvd | b | 0.00 | 100.00 | n/a |" in "\n".join(
        per_class_lines({"hosvd": {"per_class": per_class}}, "Per class")
    )


def test_the_model_card_counts_conflicts_and_skipped_files(tiny_model: Path) -> None:
    from leuk_fhir.model.artifact import read_artifact
    from leuk_fhir.model.model_card import render_model_card

    manifest = read_artifact(tiny_model).manifest
    plain = render_model_card(manifest, "0" * 64)
    assert "- Byte-identical duplicates dropped: 0\n" in plain  # unchanged without any
    manifest["training"]["data"].update(
        duplicate_label_conflicts=2, duplicate_conflicts=[], skipped_files=3
    )
    card = render_model_card(manifest, "0" * 64)
    assert "carry different labels (left out): 2" in card
    assert "hidden folders): 3" in card
