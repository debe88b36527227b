"""The classify stage: findings, out-of-distribution answers, thread safety, determinism."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from leuk_fhir.findings import INDETERMINATE, CellFinding
from leuk_fhir.model import load_classifier
from leuk_fhir.model.cnn import CNNConfig
from leuk_fhir.model.synthetic import generate_cell
from leuk_fhir.model.training import fit_pipeline
from leuk_fhir.model.workflow import synthetic_dataset

from .conftest import TINY_CONFIG


def test_classify_returns_one_finding_per_crop(tiny_model: Path) -> None:
    clf = load_classifier(tiny_model, device="cpu")
    rng = np.random.default_rng(0)
    crops = [generate_cell("blast", rng, 96) for _ in range(10)] + [
        generate_cell("normal", rng, 96) for _ in range(10)
    ]
    crops.append(generate_cell("blast", rng, 150)[:, 10:140])  # another size, not square
    findings = clf.classify(crops)
    assert len(findings) == len(crops) and all(isinstance(f, CellFinding) for f in findings)
    labels = [f.label for f in findings]
    assert labels[:10].count("blast") >= 9 and labels[10:20].count("normal") >= 9
    for f in findings:
        assert f.box is None
        assert set(f.probabilities) == {"blast", "normal"} == set(f.residuals)
        assert abs(sum(f.probabilities.values()) - 1) < 1e-6
        if not f.indeterminate:
            assert f.label == min(f.residuals, key=f.residuals.__getitem__)
    assert clf.classify([]) == []


def test_noise_and_flat_images_are_indeterminate(tiny_model: Path) -> None:
    clf = load_classifier(tiny_model, device="cpu")
    rng = np.random.default_rng(1)
    odd = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(5)]
    odd += [np.full((96, 96, 3), (30, 200, 40), dtype=np.uint8), np.zeros((64, 64, 3), np.uint8)]
    findings = clf.classify(odd)
    assert sum(f.indeterminate for f in findings) >= 6
    flagged = next(f for f in findings if f.indeterminate)
    assert flagged.label == INDETERMINATE and flagged.confidence == 0.0
    assert "out of distribution" in (flagged.indeterminate_reason or "")


def test_concurrent_callers_get_the_same_answers(tiny_model: Path) -> None:
    clf = load_classifier(tiny_model, device="cpu")
    crops = [generate_cell(k, i, 96) for i, k in enumerate(["blast", "normal"] * 6)]
    expected = [f.residuals for f in clf.classify(crops)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: [f.residuals for f in clf.classify(crops)], range(8)))
    assert all(r == expected for r in results)


def test_training_is_deterministic_for_a_seed() -> None:
    ds = synthetic_dataset(12, seed=2, image_size=TINY_CONFIG.image_size, cell_size=64)
    runs = [
        fit_pipeline(ds.images, ds.y, ds.class_names, TINY_CONFIG, with_svm=False) for _ in range(2)
    ]
    for (name, a), (_, b) in zip(
        runs[0].cnn.state_dict().items(), runs[1].cnn.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    maps, _ = runs[0].features(ds.images)
    assert np.array_equal(runs[0].hosvd.residuals(maps), runs[1].hosvd.residuals(maps))


def test_dihedral_average_makes_features_orientation_free(tiny_model: Path, tmp_path: Path) -> None:
    import dataclasses

    from leuk_fhir.model.cnn import extract
    from leuk_fhir.model.images import prepare_batch
    from leuk_fhir.model.workflow import train_and_save

    assert not load_classifier(tiny_model, device="cpu").dihedral_average  # off by default
    assert not load_classifier(device="cpu").dihedral_average  # older file: read as off
    ds = synthetic_dataset(12, seed=3, image_size=TINY_CONFIG.image_size, cell_size=64)
    path = tmp_path / "dihedral.lfm"
    config = dataclasses.replace(TINY_CONFIG, dihedral_average=True)
    train_and_save(ds, path, config, name="dihedral-test", version="1")
    clf = load_classifier(path, device="cpu")
    assert clf.dihedral_average  # the choice travels in the model file
    rng = np.random.default_rng(3)
    batch = prepare_batch([generate_cell("blast", rng, 96) for _ in range(4)], clf.image_size)
    turned = np.ascontiguousarray(np.rot90(batch, 1, axes=(1, 2))[:, :, ::-1])

    def run(images: np.ndarray, dihedral: bool) -> tuple[np.ndarray, np.ndarray]:
        return extract(clf.cnn, images, clf.mean, clf.std, clf.device, dihedral=dihedral)

    maps, soft = run(batch, True)
    maps_t, soft_t = run(turned, True)
    # Maps of the turned crop are the turned maps; the softmax output does not change.
    expected = np.rot90(maps, 1, axes=(2, 3))[:, :, :, ::-1]
    assert np.allclose(maps_t, expected, atol=1e-5) and np.allclose(soft_t, soft, atol=1e-6)
    plain, _ = run(batch, False)
    plain_t, _ = run(turned, False)
    assert not np.allclose(plain_t, np.rot90(plain, 1, axes=(2, 3))[:, :, :, ::-1], atol=1e-5)


def test_inference_folds_batch_norm_without_changing_outputs(tiny_model: Path) -> None:
    from leuk_fhir.model.cnn import CellCNN, extract, fuse_batch_norm, has_batch_norm

    torch.manual_seed(0)
    net = CellCNN(
        CNNConfig(n_classes=3, widths=(8, 16, 24), stage_depths=(1, 2, 2), feature_stages=2)
    )
    net.get_buffer("stage_scales").copy_(torch.tensor([0.5, 2.0]))
    net.train()
    with torch.no_grad():  # batch-norm statistics far from the identity
        for _ in range(5):
            net(torch.randn(16, 3, 32, 32) * 3 + 1)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fuse_batch_norm(net)
    assert has_batch_norm(net) and not has_batch_norm(fused)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # untouched
    x = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        maps, logits = net.features_and_logits(x)
        maps_f, logits_f = fused.features_and_logits(x)
    assert maps.abs().max() > 0.1
    assert torch.allclose(maps_f, maps, rtol=1e-4, atol=1e-5 * float(maps.abs().max()))
    assert torch.allclose(logits_f, logits, atol=1e-4)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    cpu = torch.device("cpu")
    got, got_f = extract(net, images, mean, std, cpu), extract(fused, images, mean, std, cpu)
    assert np.allclose(got[0], got_f[0], atol=1e-6) and np.allclose(got[1], got_f[1], atol=1e-6)
    assert has_batch_norm(net)  # extract folded a copy, not the trainable CNN
    assert not has_batch_norm(load_classifier(tiny_model, device="cpu").cnn)


def test_auto_epochs_aim_at_a_fixed_number_of_steps() -> None:
    from leuk_fhir.model.training import MAX_EPOCHS, MIN_EPOCHS, resolve_epochs

    assert resolve_epochs(7, 3200, 64) == 7  # an explicit value wins
    assert resolve_epochs(0, 3200, 64) == 40  # a PBC training fold
    assert resolve_epochs(0, 100_000, 64) == MIN_EPOCHS
    assert resolve_epochs(0, 208, 64) == MAX_EPOCHS  # an ALL-IDB2 training fold


def test_stage_depths_must_match_the_stages() -> None:
    from leuk_fhir.model.cnn import CellCNN, CNNConfig

    with pytest.raises(ValueError, match="stage_depths"):
        CNNConfig(n_classes=2, widths=(8, 16), stage_depths=(1, 2, 2))
    with pytest.raises(ValueError, match="stage_depths"):
        CNNConfig(n_classes=2, widths=(8, 16), stage_depths=(1, 0))
    net = CellCNN(CNNConfig(n_classes=2, widths=(8, 16), stage_depths=(1, 3)))
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 4


def test_training_precision_is_resolved_from_the_hardware() -> None:
    from leuk_fhir.model.cnn import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)


def test_stacked_feature_stages_are_balanced_and_survive_the_model_file(tmp_path: Path) -> None:
    from dataclasses import replace

    from leuk_fhir.model.workflow import train_and_save

    config = replace(TINY_CONFIG, feature_stages=3)
    ds = synthetic_dataset(10, seed=3, image_size=config.image_size, cell_size=64)
    pipeline, _, _ = train_and_save(ds, tmp_path / "stacked.lfm", config)
    maps, _ = pipeline.features(ds.images)
    widths = config.widths[-3:]
    assert maps.shape[1:] == (sum(widths), config.feature_grid, config.feature_grid)
    # Each stage's block carries the energy of the last stage's block on the training set.
    bounds = np.cumsum((0, *widths))
    energy = [
        np.sqrt(np.mean(np.sum(maps[:, a:b].astype(np.float64) ** 2, axis=(1, 2, 3))))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    assert np.allclose(energy, energy[-1], rtol=1e-3), energy
    # The stage scales travel in the model file: the loaded model answers as the fitted one.
    clf = load_classifier(tmp_path / "stacked.lfm", device="cpu")
    assert clf.cnn.config.feature_stages == 3
    assert np.allclose(
        clf.run(list(ds.images)).residuals, pipeline.hosvd.residuals(maps), atol=1e-5
    )
    assert "last 3 stages" in clf.info.model_card_markdown
    with pytest.raises(ValueError, match="feature_stages"):
        CNNConfig(n_classes=2, feature_stages=5)


def test_blurred_cells_are_indeterminate_as_out_of_focus(tiny_model: Path, tmp_path: Path) -> None:
    from scipy import ndimage

    from leuk_fhir.model.artifact import read_artifact, write_artifact

    clf = load_classifier(tiny_model, device="cpu")
    assert clf.focus_floor is not None and clf.focus_floor > 0
    sharp = [generate_cell(k, 300 + i, 96) for i, k in enumerate(["blast", "normal"] * 10)]
    blurred = [ndimage.gaussian_filter(c, (6, 6, 0)) for c in sharp]
    out = clf.run(sharp + blurred)
    assert (out.focus_scores[:20] < 1).all() and (out.focus_scores[20:] > 1).all()
    findings = clf.classify(blurred)
    assert all(f.indeterminate for f in findings)
    assert all("out of focus" in (f.indeterminate_reason or "") for f in findings)
    # A model file from before the focus check has no floor: nothing is out of focus.
    artifact = read_artifact(tiny_model)
    manifest = dict(artifact.manifest)
    manifest["preprocessing"] = {
        k: v for k, v in manifest["preprocessing"].items() if k != "focus_floor"
    }
    old = tmp_path / "old.lfm"
    write_artifact(old, manifest, artifact.cnn_state, artifact.hosvd_arrays)
    legacy = load_classifier(old, device="cpu")
    assert legacy.focus_floor is None and not legacy.run(blurred).focus_scores.any()
