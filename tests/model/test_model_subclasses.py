"""Labelled sub-classes: kinds of cell inside a class, learnt by every head and merged to classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leuk_fhir.model.cnn import CellCNN, CNNConfig
from leuk_fhir.model.dataset import load_dataset
from leuk_fhir.model.hosvd import HOSVDClassifier, relative_residuals
from leuk_fhir.model.synthetic import generate_cell

from .conftest import TINY_CONFIG

LIMIT = 10_000_000


def _write(folder: Path, n: int, kind: str = "normal", seed: int = 0, tint: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cell = generate_cell(kind, rng, 64).astype(np.int16) + tint
        Image.fromarray(np.clip(cell, 0, 255).astype(np.uint8)).save(folder / f"{kind}{i}.png")


def test_subclass_folders_are_read_only_when_asked(tmp_path: Path) -> None:
    _write(tmp_path / "lymphocyte", 3, seed=1)
    _write(tmp_path / "other" / "basophil", 2, "blast", seed=2)
    _write(tmp_path / "other" / "monocyte", 4, "blast", seed=3, tint=30)
    _write(tmp_path / "other", 1, seed=4)  # directly in the class folder: the class's own kind
    plain = load_dataset(tmp_path, 24, LIMIT)
    assert plain.subclasses is None and plain.sub_y is None
    assert plain.counts() == {"lymphocyte": 3, "other": 7}
    ds = load_dataset(tmp_path, 24, LIMIT, subclass_folders=True)
    assert ds.subclasses is not None and ds.sub_y is not None
    assert ds.subclasses.to_json(ds.class_names) == {
        "lymphocyte": ["lymphocyte"],
        "other": ["basophil", "monocyte", "other"],
    }
    names = np.array(ds.subclasses.names)[ds.sub_y]
    parents = np.array(ds.subclasses.parents)[ds.sub_y]
    assert np.array_equal(parents, ds.y)  # every kind sits inside its image's class
    assert sorted(names.tolist()).count("monocyte") == 4
    assert [n for n, p in zip(names, ds.paths, strict=True) if "basophil" in p] == ["basophil"] * 2
    assert ds.summary()["subclasses"] == ds.subclasses.to_json(ds.class_names)
    assert ds.fingerprint != plain.fingerprint  # the kinds are part of what the model learns
    off = load_dataset(tmp_path, 24, LIMIT, subclass_folders=True, subclasses=False)
    assert off.subclasses is None and off.fingerprint == plain.fingerprint


def test_binary_relabelling_keeps_the_merged_classes_as_kinds(tmp_path: Path) -> None:
    for name, seed in (("lymphocyte", 1), ("monocyte", 2), ("neutrophil", 3)):
        _write(tmp_path / name, 3, seed=seed, tint=10 * seed)
    ds = load_dataset(tmp_path, 24, LIMIT, binary_positive="lymphocyte")
    assert ds.class_names == ("lymphocyte", "other")
    assert ds.subclasses is not None
    assert ds.subclasses.to_json(ds.class_names) == {
        "lymphocyte": ["lymphocyte"],
        "other": ["monocyte", "neutrophil"],
    }
    assert (
        load_dataset(tmp_path, 24, LIMIT, binary_positive="lymphocyte", subclasses=False).sub_y
        is None
    )
    # two classes merged into nothing new: no kinds
    assert load_dataset(tmp_path, 24, LIMIT).subclasses is None


def test_manifest_fourth_column_names_the_kind(tmp_path: Path) -> None:
    _write(tmp_path / "img", 4, seed=5)
    files = sorted((tmp_path / "img").glob("*.png"))
    rows = ["path,label,group,subclass"]
    rows += [
        f"img/{f.name},{'blast' if i < 2 else 'normal'},p{i},{'' if i < 2 else f'k{i}'}"
        for i, f in enumerate(files)
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "m.csv", 24, LIMIT)
    assert ds.subclasses is not None
    assert ds.subclasses.to_json(ds.class_names) == {"blast": ["blast"], "normal": ["k2", "k3"]}


def _union_of_subspaces(
    rng: np.random.Generator, n: int, dims: int = 2, shape: tuple[int, int] = (10, 4)
) -> np.ndarray:
    """``n`` tensors drawn from one random ``dims``-dimensional subspace of (C x P) tensors."""
    basis = np.linalg.qr(rng.standard_normal((shape[0] * shape[1], dims)))[0]
    return (rng.standard_normal((n, dims)) @ basis.T).reshape(n, *shape)


def test_hosvd_gives_each_labelled_kind_its_own_subspace() -> None:
    rng = np.random.default_rng(0)
    kinds = [_union_of_subspaces(rng, 30) for _ in range(3)]  # kinds 0 and 1 form class "a"
    x = np.concatenate(kinds)
    y = np.array(["a"] * 60 + ["b"] * 30)
    sub = np.repeat([0, 1, 2], 30)
    fixed = {"channel_rank": 1.0, "position_rank": 1.0, "n_basis": 2}
    labelled = HOSVDClassifier(**fixed).fit(x, y, subclasses=sub)
    assert labelled.n_subspaces_ == 0
    assert [c for c, _ in labelled.subspaces_] == [0, 0, 1]
    assert np.array_equal(labelled.predict(x), y)
    assert labelled.residuals(x).min(axis=1).max() < 1e-4  # every member lies in its kind
    # One subspace for the union of two planes: two basis images cannot hold it.
    single = HOSVDClassifier(**fixed, n_subspaces=1).fit(x, y)
    assert single.residuals(x[:60])[:, 0].max() > 0.1
    # The kinds survive the model file's state.
    restored = HOSVDClassifier.from_state(*labelled.to_state())
    assert np.allclose(restored.residuals(x), labelled.residuals(x), atol=1e-5)
    # kind 0's subspace holds kind 0, not kind 1 of the same class
    first = labelled.subspaces_[0][1]
    assert relative_residuals(x[:30], first).max() < 1e-4
    assert relative_residuals(x[30:60], first).min() > 0.5
    with pytest.raises(ValueError, match="sub-class labels"):
        HOSVDClassifier().fit(x, y, subclasses=sub[:10])


def test_cnn_class_probability_is_the_sum_of_its_kinds() -> None:
    torch.manual_seed(0)
    config = CNNConfig(n_classes=2, widths=(4, 8), stage_depths=(1, 1), subclass_parents=(0, 1, 1))
    net = CellCNN(config).eval()
    x = torch.randn(5, 3, 16, 16)
    outputs = net(x)
    assert outputs.shape == (5, 3)
    _, logits = net.features_and_logits(x)
    kinds = torch.softmax(outputs, dim=1)
    classes = torch.softmax(logits, dim=1)
    assert torch.allclose(classes[:, 0], kinds[:, 0], atol=1e-6)
    assert torch.allclose(classes[:, 1], kinds[:, 1] + kinds[:, 2], atol=1e-6)
    with pytest.raises(ValueError, match="subclass_parents"):
        CNNConfig(n_classes=3, subclass_parents=(0, 1, 1))


def test_a_model_trained_on_kinds_answers_with_classes(tmp_path: Path) -> None:
    from leuk_fhir.model.artifact import read_artifact
    from leuk_fhir.model.classifier import load_classifier
    from leuk_fhir.model.evaluation import cross_validate, render_markdown
    from leuk_fhir.model.workflow import train_and_save

    _write(tmp_path / "data" / "blast", 16, "blast", seed=1)
    _write(tmp_path / "data" / "normal", 16, seed=2)
    _write(tmp_path / "data" / "pale", 16, seed=3, tint=40)
    data = load_dataset(tmp_path / "data", TINY_CONFIG.image_size, LIMIT, binary_positive="blast")
    assert data.subclasses is not None
    report = cross_validate(data, 2, TINY_CONFIG)
    assert report["dataset"]["subclasses"]["other"] == ["normal", "pale"]
    assert all(f["hosvd_selection"]["n_subspaces"] == 0 for f in report["per_fold"])
    for head in ("hosvd", "softmax", "svm"):
        assert np.array(report["heads"][head]["confusion_matrix"]).shape == (2, 2)
    assert "labelled kinds of cell" in render_markdown(report)
    path = tmp_path / "kinds.lfm"
    pipeline, _, _ = train_and_save(data, path, TINY_CONFIG)
    cnn = read_artifact(path).manifest["cnn"]
    assert cnn["subclass_parents"] == [0, 1, 1]
    assert cnn["subclass_names"] == ["blast", "normal", "pale"]
    clf = load_classifier(path, device="cpu")
    assert clf.class_names == ("blast", "other")
    assert "one subspace per labelled kind of cell" in (clf.info.model_card_markdown or "")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in data.paths[:6]]
    batch = clf.run(images)
    assert batch.probabilities.shape == (6, 2)
    assert np.allclose(batch.probabilities.sum(axis=1), 1.0)
    # The file gives the same answers as the pipeline it was written from.
    from leuk_fhir.model.images import prepare_batch

    heads = pipeline.predict_heads(prepare_batch(images, TINY_CONFIG.image_size, data.framing.crop))
    assert np.allclose(batch.probabilities, heads["hosvd"].scores, atol=1e-5)


def test_subclass_pattern_reads_the_kind_from_file_names(tmp_path: Path) -> None:
    from leuk_fhir.errors import DatasetError

    for cls, kinds in (("ig", ("MMY", "PMY")), ("neutrophil", ("SNE",))):
        for k, kind in enumerate(kinds):
            _write(tmp_path / "raw" / cls / kind, 2, seed=k + 10 * len(cls))
            for f in (tmp_path / "raw" / cls / kind).glob("*.png"):
                f.rename(tmp_path / "raw" / cls / f"{kind}_{k}{f.stem}.png")
    ds = load_dataset(tmp_path / "raw", 24, LIMIT, subclass_pattern=r"^([A-Z]+)_")
    assert ds.subclasses is not None
    assert ds.subclasses.to_json(ds.class_names) == {"ig": ["MMY", "PMY"], "neutrophil": ["SNE"]}
    binary = load_dataset(
        tmp_path / "raw", 24, LIMIT, subclass_pattern=r"^([A-Z]+)_", binary_positive="neutrophil"
    )
    assert binary.subclasses is not None
    assert binary.subclasses.to_json(binary.class_names)["other"] == ["ig/MMY", "ig/PMY"]
    with pytest.raises(DatasetError, match="not a regular expression"):
        load_dataset(tmp_path / "raw", 24, LIMIT, subclass_pattern="([A-Z")


def test_loss_weights_balance_classes_not_kinds() -> None:
    from leuk_fhir.model.cnn import loss_weights

    plain = CNNConfig(n_classes=2)
    y = np.array([0] * 30 + [1] * 10)
    assert np.allclose(loss_weights(y, plain), [40 / 60, 40 / 20])
    # class 1 = a common kind (output 1, 200 images) and a rare one (output 2, 7 images)
    kinds = CNNConfig(n_classes=2, subclass_parents=(0, 1, 1))
    y = np.array([0] * 100 + [1] * 200 + [2] * 7)
    w = loss_weights(y, kinds)
    assert w[1] == w[2]  # the rare kind is not blown up
    assert np.isclose(100 * w[0], 207 * w[1])  # the two classes weigh the same in total


def test_cli_kinds_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from leuk_fhir.cli import main

    for name, seed in (("blast", 1), ("normal", 2), ("pale", 3)):
        _write(
            tmp_path / "data" / name, 6, "blast" if name == "blast" else "normal", seed, 20 * seed
        )
    common = ["--folds", "2", "--epochs", "2", "--image-size", "32", "--crop", "1"]
    common += ["--binary-positive", "blast"]
    for extra, kinds in (
        ([], {"blast": ["blast"], "other": ["normal", "pale"]}),
        (["--no-subclasses"], None),
    ):
        out = tmp_path / f"eval{len(extra)}"
        assert main(["evaluate", str(tmp_path / "data"), *common, *extra, "--out", str(out)]) == 0
        assert json.loads((out / "report.json").read_text())["dataset"]["subclasses"] == kinds
    capsys.readouterr()
    bad = [
        "evaluate",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "e"),
        "--subclass-pattern",
        "([",
    ]
    assert main(bad) == 3
    assert "not a regular expression" in capsys.readouterr().err
