"""Training augmentation: the standard recipe and the scanner recipe's magnification, focus
and stain changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leuk_fhir.model.cnn import AUGMENTATIONS, Augmentation, _blur, augment


def _disc(n: int = 8, side: int = 64, radius: int = 14) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    inside = ((yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2) < radius**2
    return torch.where(inside, 0.9, 0.1).float().expand(n, 3, side, side).contiguous()


def _areas(x: torch.Tensor) -> np.ndarray:
    """Share of each crop above the midpoint of its range (the disc)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x > (lo + hi) / 2).float().mean(dim=(1, 2, 3)).numpy()


def test_blur_is_a_normalised_gaussian_per_crop() -> None:
    point = torch.zeros(2, 3, 41, 41)
    point[:, :, 20, 20] = 1.0
    out = _blur(point, torch.tensor([0.0, 2.0]))
    assert torch.allclose(out[0], point[0], atol=1e-6)  # sigma 0 leaves the crop as it is
    assert torch.allclose(out[1].sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
    offsets = torch.arange(41.0) - 20
    variance = float((out[1, 0].sum(dim=0) * offsets**2).sum())
    assert variance == pytest.approx(4.0, rel=0.02)


def test_zoom_changes_the_cell_size_within_the_recipe_bounds() -> None:
    x = _disc(32)
    still = Augmentation(max_shift=0.0)
    zoom = Augmentation(max_shift=0.0, scale=0.18)
    base = _areas(augment(x, torch.Generator().manual_seed(0), still))
    zoomed = _areas(augment(x, torch.Generator().manual_seed(0), zoom))
    ratio = zoomed / base
    assert np.all(ratio > np.exp(-2 * 0.18) * 0.9) and np.all(ratio < np.exp(2 * 0.18) * 1.1)
    assert ratio.min() < 0.85 and ratio.max() > 1.15  # both smaller and larger cells


def test_stain_gain_darkens_and_pales_in_optical_density() -> None:
    grey = torch.full((512, 3, 4, 4), 0.5)  # optical density log(2) in every channel
    plain = augment(grey, torch.Generator().manual_seed(1), Augmentation(max_shift=0.0))
    recipe = Augmentation(max_shift=0.0, stain_od=0.15)
    stained = augment(grey, torch.Generator().manual_seed(1), recipe)
    od_plain = -torch.log(plain[:, :, 0, 0])
    od_stained = -torch.log(stained[:, :, 0, 0])
    # Brightness and stain jitter alone move the density by at most about 0.17; the gain
    # adds up to 0.15 x log(2) either way, channel by channel.
    jitter = 0.17
    assert float((od_plain - np.log(2)).abs().max()) < jitter
    assert float(od_stained.max()) < 1.15 * np.log(2) + jitter
    assert float(od_stained.min()) > 0.85 * np.log(2) - jitter
    assert float(od_stained.std()) > 1.2 * float(od_plain.std())
    assert float(od_stained.max()) > float(od_plain.max()) + 0.03  # darker crops appear too


def test_scanner_recipe_is_deterministic_and_differs_from_standard() -> None:
    x = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    a = augment(x, torch.Generator().manual_seed(5), AUGMENTATIONS["scanner"])
    b = augment(x, torch.Generator().manual_seed(5), AUGMENTATIONS["scanner"])
    standard = augment(x, torch.Generator().manual_seed(5), AUGMENTATIONS["standard"])
    assert torch.equal(a, b) and not torch.equal(a, standard)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_a_model_trained_with_the_scanner_recipe_records_it(tmp_path) -> None:
    from dataclasses import replace

    from leuk_fhir.model.artifact import read_artifact
    from leuk_fhir.model.workflow import synthetic_dataset, train_and_save

    from .conftest import TINY_CONFIG

    config = replace(TINY_CONFIG, augmentation="scanner", epochs=2)
    dataset = synthetic_dataset(12, seed=3, image_size=config.image_size, cell_size=64)
    path = tmp_path / "scanner.lfm"
    train_and_save(dataset, path, config)
    assert read_artifact(path).manifest["training"]["config"]["augmentation"] == "scanner"
    with pytest.raises(ValueError, match="augmentation must be one of"):
        train_and_save(dataset, tmp_path / "x.lfm", replace(config, augmentation="heavy"))
