"""Dataset readers, duplicate removal and deterministic (grouped) folds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leuk_fhir.errors import DatasetError
from leuk_fhir.model.dataset import list_images, load_dataset, skipped_text, stratified_folds
from leuk_fhir.model.synthetic import generate_cell

LIMIT = 64_000_000


def _save(path: Path, kind: str, seed: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(generate_cell(kind, seed, size)).save(path)
    return path


def test_class_folders_with_mixed_sizes_and_formats(tmp_path: Path) -> None:
    for i in range(4):
        _save(tmp_path / "blast" / f"b{i}.png", "blast", i, 64 + 16 * i)
        _save(tmp_path / "normal" / f"n{i}.jpg", "normal", 10 + i, 80)
    ds = load_dataset(tmp_path, image_size=32, max_pixels=LIMIT)
    assert ds.class_names == ("blast", "normal")
    assert ds.images.shape == (8, 32, 32, 3)
    assert ds.counts() == {"blast": 4, "normal": 4}
    assert list(ds.y) == [0, 0, 0, 0, 1, 1, 1, 1]
    again = load_dataset(tmp_path, image_size=32, max_pixels=LIMIT)
    assert again.fingerprint == ds.fingerprint


def test_all_idb_naming(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"Im{i:03d}_1.tif", "blast", i)
        _save(tmp_path / f"Im{10 + i:03d}_0.jpg", "normal", i)
    items = list_images(tmp_path)
    assert sorted({i.label for i in items}) == ["blast", "normal"]
    assert {i.path.name: i.label for i in items}["Im001_1.tif"] == "blast"


def test_csv_manifest_groups_never_straddle_a_split(tmp_path: Path) -> None:
    rows = ["path,label,group"]
    for patient in range(8):
        for j in range(3):
            kind = "blast" if patient % 2 else "normal"
            name = f"img/p{patient}_{j}.png"
            _save(tmp_path / name, kind, patient * 10 + j, 40)
            rows.append(f"{name},{kind},patient{patient}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    ds = load_dataset(manifest, image_size=24, max_pixels=LIMIT)
    assert ds.groups is not None and len(ds.labels) == 24
    folds = stratified_folds(ds.labels, 4, seed=0, groups=ds.groups)
    for train, test in folds:
        assert not set(ds.groups[train]) & set(ds.groups[test])
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(24))
    again = stratified_folds(ds.labels, 4, seed=0, groups=ds.groups)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))


def test_stratified_folds_are_deterministic_and_balanced() -> None:
    labels = np.array(["a"] * 20 + ["b"] * 10)
    folds = stratified_folds(labels, 5, seed=3)
    assert [sorted(labels[t].tolist()).count("b") for _, t in folds] == [2] * 5
    assert all(
        (a[1] == b[1]).all()
        for a, b in zip(folds, stratified_folds(labels, 5, seed=3), strict=True)
    )
    with pytest.raises(DatasetError, match="fewer than the 11 that 11 folds need"):
        stratified_folds(labels, 11)


def test_folds_refuse_a_class_too_small_for_the_hosvd_head() -> None:
    """Every training part needs two images of each class (the HOSVD head's inner
    cross-validation): 2 folds need 4 per class, refused up front rather than after training."""
    labels = np.array(["a"] * 10 + ["b"] * 3)
    with pytest.raises(DatasetError, match="class 'b' has 3 image\\(s\\), fewer than the 4 that 2"):
        stratified_folds(labels, 2)
    assert len(stratified_folds(labels, 3)) == 3  # 3 folds: each trains on 2 of the 3
    for train, _ in stratified_folds(np.array(["a"] * 10 + ["b"] * 4), 2):
        assert (np.array(["a"] * 10 + ["b"] * 4)[train] == "b").sum() >= 2
    with pytest.raises(DatasetError, match="at least 2 folds, not 1"):
        stratified_folds(labels, 1)
    groups = np.array([f"g{i}" for i in range(10)] + ["x", "y", "y"])
    with pytest.raises(DatasetError, match="would train on 1 image\\(s\\) of class 'b'"):
        stratified_folds(labels, 3, groups=groups)


def test_byte_identical_duplicates_are_dropped_and_reported(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / "blast" / f"b{i}.png", "blast", i)
        _save(tmp_path / "normal" / f"n{i}.png", "normal", 20 + i)
    shutil.copy(tmp_path / "blast" / "b0.png", tmp_path / "blast" / "copy.png")
    shutil.copy(tmp_path / "blast" / "b1.png", tmp_path / "normal" / "mislabelled.png")
    ds = load_dataset(tmp_path, image_size=24, max_pixels=LIMIT)
    # b1.png is in both classes: its label is unknown, so neither copy is used
    assert ds.counts() == {"blast": 2, "normal": 3}
    assert str(tmp_path / "blast" / "b1.png") not in ds.paths
    assert ds.duplicates.dropped == ((str(tmp_path / "blast" / "copy.png"), ds.paths[0]),)
    conflict = (
        (str(tmp_path / "blast" / "b1.png"), "blast"),
        (str(tmp_path / "normal" / "mislabelled.png"), "normal"),
    )
    assert ds.duplicates.conflicts == (conflict,)
    summary = ds.summary()
    assert summary["duplicates_dropped"] == 1 and summary["duplicate_label_conflicts"] == 1
    assert summary["duplicate_conflicts"] == [[{"path": p, "label": c} for p, c in conflict]]


def test_a_class_emptied_by_conflicting_copies_is_an_error(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / "lymphocyte" / f"l{i}.png", "normal", i)
        _save(tmp_path / "neutrophil" / f"n{i}.png", "blast", 20 + i)
    shutil.copytree(tmp_path / "lymphocyte", tmp_path / "monocyte")
    with pytest.raises(DatasetError, match="class 'lymphocyte' has no images left"):
        load_dataset(tmp_path, image_size=24, max_pixels=LIMIT)


def test_class_names_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    for i in range(2):
        _save(tmp_path / "ALL" / f"a{i}.png", "blast", i)
        _save(tmp_path / "all" / f"b{i}.png", "blast", 10 + i)
        _save(tmp_path / "normal" / f"n{i}.png", "normal", 20 + i)
    with pytest.raises(DatasetError, match="classes 'ALL' and 'all' differ only in case"):
        load_dataset(tmp_path, image_size=24, max_pixels=LIMIT)
    with pytest.raises(DatasetError, match="differ only in case"):  # validate reads it alike
        load_dataset(tmp_path, image_size=24, max_pixels=LIMIT, min_classes=1)
    shutil.move(tmp_path / "all", tmp_path / "normal ")  # a trailing space
    with pytest.raises(DatasetError, match="'normal' and 'normal ' differ only in case, spacing"):
        load_dataset(tmp_path, image_size=24, max_pixels=LIMIT)


def test_a_class_of_one_image_is_refused_before_training(tmp_path: Path) -> None:
    for i in range(4):
        _save(tmp_path / "lymphocyte" / f"l{i}.png", "normal", i)
    _save(tmp_path / "neutrophil" / "n0.png", "blast", 20)
    with pytest.raises(DatasetError, match="class 'neutrophil' has 1 image; training needs at le"):
        load_dataset(tmp_path, image_size=24, max_pixels=LIMIT)
    # scoring a trained model needs no minimum
    assert load_dataset(tmp_path, 24, LIMIT, min_classes=1).counts()["neutrophil"] == 1


def test_files_not_used_are_reported_and_hidden_folders_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        _save(data / "lymphocyte" / f"l{i}.png", "normal", i)
        _save(data / "neutrophil" / f"n{i}.png", "blast", 20 + i)
        _save(tmp_path / "elsewhere" / f"e{i}.png", "blast", 40 + i)
        _save(data / "lymphocyte" / ".thumbnails" / f"t{i}.png", "normal", 60 + i)
        _save(data / "neutrophil" / "@eaDir" / f"s{i}.png", "blast", 80 + i)
    (data / "neutrophil" / "more").symlink_to(tmp_path / "elsewhere")
    (data / "neutrophil" / "again").symlink_to(data / "neutrophil")  # a loop
    (data / "neutrophil" / "broken.png").symlink_to(tmp_path / "gone.png")
    _save(data / "stray.png", "blast", 99)
    (data / "README.txt").write_text("cells")
    ds = load_dataset(data, image_size=24, max_pixels=LIMIT)
    # the linked folder is followed (read once); hidden and system folders are not data
    assert ds.counts() == {"lymphocyte": 3, "neutrophil": 6}
    assert not [p for p in ds.paths if ".thumbnails" in p or "@eaDir" in p]
    assert {(s.path, s.reason) for s in ds.skipped} == {
        ("README.txt", "not an image"),
        ("stray.png", "image outside class folders"),
        ("lymphocyte/.thumbnails", "hidden or system folder"),
        ("neutrophil/@eaDir", "hidden or system folder"),
        ("neutrophil/again", "linked folder already read"),
        ("neutrophil/broken.png", "broken link"),
    }
    summary = ds.summary()
    assert summary["skipped_files"] == 6
    assert {"path": "stray.png", "reason": "image outside class folders"} in summary["skipped"]
    text = skipped_text(ds.skipped)
    assert text.startswith("skipped 6 file(s) or folder(s): 1 image outside class folders, 1 ")
    assert "(e.g. stray.png, neutrophil/broken.png, " in text


def test_a_manifest_that_is_not_utf8_and_row_errors_name_the_line(tmp_path: Path) -> None:
    _save(tmp_path / "café.png", "blast", 1)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,label\ncafé.png,blast\n".encode("cp1252"))
    with pytest.raises(DatasetError, match="is not UTF-8 text \\(byte 0xe9 at position 14\\)"):
        load_dataset(latin1, 24, LIMIT)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\ncafé.png,blast\n\nnone.png,normal\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 4: image .*none.png does not exist"):
        load_dataset(missing, 24, LIMIT)


def test_all_idb_naming_ignores_case_and_names_the_odd_files(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"im{i:03d}_1.tif", "blast", i)
        _save(tmp_path / f"Im{10 + i:03d}_0.jpg", "normal", 10 + i)
    assert len(list_images(tmp_path)) == 6
    _save(tmp_path / "Im001_1 (copy).png", "blast", 50)
    with pytest.raises(DatasetError, match=r"6 of 7 images follow the ALL-IDB .*: Im001_1 \(copy"):
        list_images(tmp_path)


def test_binary_relabelling(tmp_path: Path) -> None:
    classes = (("lymphocyte", "normal"), ("monocyte", "blast"), ("neutrophil", "blast"))
    # Distinct seeds for all six images (str hashes vary per process and could collide into
    # byte-identical files, which the loader rightly drops as duplicates).
    for c, (name, kind) in enumerate(classes):
        for i in range(2):
            _save(tmp_path / name / f"{i}.png", kind, 10 * c + i)
    ds = load_dataset(tmp_path, 24, LIMIT, binary_positive="lymphocyte")
    assert ds.counts() == {"lymphocyte": 2, "other": 4}
    # named as a user might type it: the folder's own spelling is kept
    assert load_dataset(tmp_path, 24, LIMIT, binary_positive=" Lymphocyte").counts() == ds.counts()
    with pytest.raises(DatasetError, match="not a class"):
        load_dataset(tmp_path, 24, LIMIT, binary_positive="blast")


def test_bad_datasets_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing", 24, LIMIT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(tmp_path / "empty", 24, LIMIT)
    one = tmp_path / "one"
    _save(one / "blast" / "a.png", "blast", 1)
    _save(one / "blast" / "b.png", "blast", 2)
    with pytest.raises(DatasetError, match="at least two classes"):
        load_dataset(one, 24, LIMIT)
    (one / "normal").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        load_dataset(one, 24, LIMIT)
    _save(one / "normal" / "c.png", "normal", 3)
    (one / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (one / "blast" / "cut.png").write_bytes(_save(one / "whole.png", "blast", 4).read_bytes()[:200])
    # every unusable image is named in one go, not one per run
    with pytest.raises(DatasetError, match=r"2 of 5 image\(s\) cannot be used: .*(broken|cut)\.png.*(broken|cut)\.png"):
        load_dataset(one, 24, LIMIT, crop=None)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,label\nonly-a-path\n")
    with pytest.raises(DatasetError, match="line 2"):
        load_dataset(bad_csv, 24, LIMIT)


def test_loading_keeps_one_file_in_memory_at_a_time(tmp_path: Path) -> None:
    """A folder of large uncompressed images (C-NMC ships BMP) is read file by file: the raw
    bytes of all files are never held at once (they were, before: 6 GB for 10,000 BMPs)."""
    import hashlib
    import tracemalloc

    rng = np.random.default_rng(0)
    for i in range(16):  # 16 x 3 MB of BMP
        folder = tmp_path / ("blast" if i % 2 else "normal")
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.bmp")
    total = sum(p.stat().st_size for p in tmp_path.rglob("*.bmp"))
    tracemalloc.start()
    try:
        ds = load_dataset(tmp_path, image_size=32, max_pixels=LIMIT, crop=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds.labels) == 16 and total > 45_000_000
    # about 12.5 MB now (one file's bytes and pixels at a time); 54.5 MB when all were held
    assert peak < total / 2, (peak, total)
    # The fingerprint is the same definition as before: SHA-256 over each file's digest + label.
    expected = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*.bmp"), key=str):
        expected.update(hashlib.sha256(path.read_bytes()).digest() + path.parent.name.encode())
        expected.update(b"\0")
    assert ds.fingerprint == expected.hexdigest()


def test_a_file_changed_while_loading_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files are read twice (digest, then decode); one rewritten in between is an error, not a
    silently different image. The rewrite is injected (a fake): the race cannot be timed."""
    from leuk_fhir.model import dataset as dataset_module

    for i in range(3):
        _save(tmp_path / "blast" / f"b{i}.png", "blast", i)
        _save(tmp_path / "normal" / f"n{i}.png", "normal", 10 + i)
    real = dataset_module.drop_duplicates

    def then_rewrite(items: list) -> tuple:  # type: ignore[type-arg]
        out = real(items)
        _save(tmp_path / "normal" / "n1.png", "blast", 99)
        return out

    monkeypatch.setattr(dataset_module, "drop_duplicates", then_rewrite)
    with pytest.raises(DatasetError, match=r"n1\.png changed while the dataset was being read"):
        load_dataset(tmp_path, image_size=32, max_pixels=LIMIT)


def _patient_folders(root: Path, patients: int = 6, cells: int = 3) -> Path:
    """DATA/<class>/<patient>/cell.png, patients alternating between the two classes."""
    for p in range(patients):
        kind = "blast" if p % 2 else "normal"
        for j in range(cells):
            _save(root / kind / f"patient{p}" / f"p{p}_cell{j}.png", kind, 100 * p + j, 40)
    return root


def test_group_pattern_reads_patients_from_folders_or_names(tmp_path: Path) -> None:
    data = _patient_folders(tmp_path / "data")
    by_folder = load_dataset(data, 24, LIMIT, group_pattern=r"^[^/]+/([^/]+)/")
    assert by_folder.groups is not None
    assert sorted(set(by_folder.groups.tolist())) == [f"patient{p}" for p in range(6)]
    assert by_folder.summary()["groups"] == 6
    assert "--group-pattern" in str(by_folder.summary()["grouping"])
    by_name = load_dataset(data, 24, LIMIT, group_pattern=r"(p\d+)_cell")
    assert by_name.groups is not None
    assert [g.replace("p", "patient") for g in by_name.groups] == by_folder.groups.tolist()
    folds = stratified_folds(by_folder.labels, 3, seed=0, groups=by_folder.groups)
    for train, test in folds:
        assert not set(by_folder.groups[train]) & set(by_folder.groups[test])
    # Without a pattern these folders carry no groups: images are split one by one.
    plain = load_dataset(data, 24, LIMIT)
    assert plain.groups is None and plain.summary()["grouping"] is None


def test_group_pattern_errors_are_clear(tmp_path: Path) -> None:
    data = _patient_folders(tmp_path / "data")
    _save(data / "blast" / "loose.png", "blast", 999, 40)
    with pytest.raises(DatasetError, match="no group for 1 of 19 images, e.g. blast/loose.png"):
        load_dataset(data, 24, LIMIT, group_pattern=r"^[^/]+/([^/]+)/")
    with pytest.raises(DatasetError, match="not a regular expression"):
        load_dataset(data, 24, LIMIT, group_pattern="(patient")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "".join(f"data/blast/patient1/p1_cell{j}.png,blast,P1\n" for j in range(3))
        + "".join(f"data/normal/patient0/p0_cell{j}.png,normal,P0\n" for j in range(3))
    )
    with pytest.raises(DatasetError, match="already names each image's group"):
        load_dataset(manifest, 24, LIMIT, group_pattern="(p\\d)")
    assert load_dataset(manifest, 24, LIMIT).grouping == "the manifest's group column"
    assert load_dataset(manifest, 24, LIMIT, groups=False).groups is None


def test_c_nmc_file_names_group_cells_by_subject(tmp_path: Path) -> None:
    subjects = {"all": ["11", "12", "13"], "hem": ["H10", "H11", "H12"]}
    for label, ids in subjects.items():
        kind = "blast" if label == "all" else "normal"
        for n, subject in enumerate(ids):
            for cell in range(2):
                name = f"UID_{subject}_{n + 1}_{cell + 1}_{label}.bmp"
                _save(tmp_path / label / name, kind, 10 * n + cell + (50 if label == "hem" else 0))
    ds = load_dataset(tmp_path, 24, LIMIT)
    assert ds.groups is not None
    assert sorted(set(ds.groups.tolist())) == ["11", "12", "13", "H10", "H11", "H12"]
    assert "C-NMC" in str(ds.grouping)
    assert load_dataset(tmp_path, 24, LIMIT, groups=False).groups is None
    # One file outside the naming: no automatic groups (they must cover every image).
    _save(tmp_path / "all" / "extra.bmp", "blast", 77)
    assert load_dataset(tmp_path, 24, LIMIT).groups is None


def test_grouped_folds_refuse_a_class_they_cannot_train_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    labels = np.array(["x"] * 4 + ["y"] * 12)
    single = np.array(["a"] * 4 + [f"y{i // 2}" for i in range(12)])
    with pytest.raises(DatasetError, match="class 'x' comes from one group only"):
        stratified_folds(labels, 3, seed=0, groups=single)
    # scikit-learn's grouped splitter balances classes, so two groups of a class never land in
    # one test fold in practice; a fake splitter that does so checks the guard behind it.
    two = np.array(["a", "a", "b", "b"] + [f"y{i // 2}" for i in range(12)])

    class _Clumping:
        def __init__(self, n_splits: int, **_: object) -> None:
            self.n = n_splits

        def split(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray):
            order = sorted(set(groups.tolist()))
            for k in range(self.n):
                test = np.isin(groups, order[k :: self.n]) if k else np.isin(groups, ["a", "b"])
                yield np.flatnonzero(~test), np.flatnonzero(test)

    import sklearn.model_selection

    monkeypatch.setattr(sklearn.model_selection, "StratifiedGroupKFold", _Clumping)
    with pytest.raises(DatasetError, match="fold 1 would train without class 'x'"):
        stratified_folds(labels, 3, seed=0, groups=two)
