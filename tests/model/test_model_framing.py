"""Framing: the nucleus search, the auto crop rule, and the crop travelling with the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leuk_fhir.model.dataset import load_dataset
from leuk_fhir.model.framing import (
    MIN_FOUND_SHARE,
    WORK_SIDE,
    Framing,
    choose_crop,
    nucleus_extent,
    parse_crop,
    sample_indices,
)
from leuk_fhir.model.images import centre_crop, pad_to_square, square_resize

from .conftest import TINY_CONFIG

PBC = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "pbc"
PLASMA = (236, 214, 205)  # pale pink background
RED_CELL = (214, 150, 160)  # pink: blue below green + 40, so never a nucleus
NUCLEUS = (96, 52, 150)  # blue-violet


def smear(side: int, nucleus_radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """A square field: plasma, two red cells, and a stained nucleus disc (radius in pixels)."""
    yy, xx = np.mgrid[:side, :side]
    image = np.empty((side, side, 3), np.uint8)
    image[:] = PLASMA
    for cy, cx in ((0.15, 0.2), (0.85, 0.8)):
        image[(yy - cy * side) ** 2 + (xx - cx * side) ** 2 < (0.1 * side) ** 2] = RED_CELL
    cy, cx = centre or ((side - 1) / 2, (side - 1) / 2)
    if nucleus_radius > 0:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= nucleus_radius**2] = NUCLEUS
    return image


@pytest.mark.parametrize("radius_share", [0.1, 0.2, 0.3, 0.45])
def test_nucleus_extent_measures_the_central_nucleus(radius_share: float) -> None:
    side = 240
    extent = nucleus_extent(smear(side, radius_share * side))
    assert extent == pytest.approx(2 * radius_share, abs=3 / WORK_SIDE)


def test_nucleus_extent_takes_the_nucleus_nearest_the_centre() -> None:
    side = 240
    image = smear(side, 0.12 * side)
    yy, xx = np.mgrid[:side, :side]
    image[(yy - 30) ** 2 + (xx - 200) ** 2 <= 25**2] = NUCLEUS  # a second cell near a corner
    assert nucleus_extent(image) == pytest.approx(0.24, abs=3 / WORK_SIDE)
    # An off-centre cell: the centred square must reach its far edge.
    off = smear(side, 0.1 * side, centre=(120 + 36, 120))
    assert nucleus_extent(off) == pytest.approx(2 * (36 + 24) / side, abs=3 / WORK_SIDE)


def test_nucleus_extent_is_none_without_a_stained_nucleus() -> None:
    assert nucleus_extent(smear(200, 0)) is None
    grey = np.full((200, 200, 3), 128, np.uint8)
    assert nucleus_extent(grey) is None
    speck = smear(200, 2)  # a fleck of stain, far below a nucleus
    assert nucleus_extent(speck) is None


def test_auto_crop_holds_the_nuclei_of_most_images_with_a_rim() -> None:
    rng = np.random.default_rng(0)
    side = 192
    radii = rng.uniform(0.08, 0.2, size=60) * side  # extents 0.16 .. 0.40
    framing = choose_crop([smear(side, r) for r in radii])
    assert framing.method == "auto" and framing.sampled == framing.with_nucleus == 60
    q95 = float(np.quantile(2 * radii / side, 0.95))
    assert framing.extent_quantile == pytest.approx(q95, abs=3 / WORK_SIDE)
    assert framing.crop >= framing.extent_quantile * 1.1 - 1e-9  # never cuts the 95% of nuclei
    assert framing.crop <= framing.extent_quantile * 1.1 + 0.05
    assert round(framing.crop / 0.05, 6) == round(framing.crop / 0.05)  # a multiple of 0.05
    assert "central" in framing.describe()


def test_auto_crop_keeps_images_the_cell_already_fills() -> None:
    framing = choose_crop([smear(128, r) for r in (50, 55, 58, 60, 62)])
    assert framing.crop == 1.0 and framing.extent_quantile is not None


def test_auto_crop_keeps_the_whole_image_when_it_cannot_see_nuclei() -> None:
    side = 128
    n_with = int(10 * MIN_FOUND_SHARE) - 1  # just below the share auto needs
    images = [smear(side, 20) for _ in range(n_with)] + [smear(side, 0)] * (10 - n_with)
    framing = choose_crop(images)
    assert framing == Framing(1.0, "auto", 10, n_with, None)
    assert "did not crop" in framing.describe()
    assert choose_crop([]).crop == 1.0


def test_parse_crop() -> None:
    assert parse_crop("auto") is None and parse_crop(" AUTO ") is None
    assert parse_crop("0.6") == 0.6 and parse_crop("1") == 1.0
    for bad in ("0", "-0.5", "1.5", "nan", "most"):
        with pytest.raises(ValueError):
            parse_crop(bad)


def test_square_resize_crops_the_centre_of_the_padded_square() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    square = pad_to_square(image)
    assert square.shape == (120, 120, 3)
    centre = centre_crop(square, 0.5)
    assert np.array_equal(centre, square[30:90, 30:90])
    assert np.array_equal(square_resize(image, 60, crop=0.5), centre)  # already 60 px
    resized = square_resize(image, 24, crop=0.5)
    assert np.array_equal(resized, square_resize(centre, 24))
    assert np.array_equal(square_resize(image, 24, crop=1.0), square_resize(image, 24))


def test_sample_indices_are_even_and_bounded() -> None:
    assert list(sample_indices(5, 400)) == [0, 1, 2, 3, 4]
    picked = sample_indices(4000, 400)
    assert len(picked) == 400 and picked[0] == 0 and picked[-1] == 3999


def _write_smears(root: Path, radii: dict[str, list[float]], side: int = 160) -> None:
    for label, values in radii.items():
        (root / label).mkdir(parents=True)
        for i, r in enumerate(values):
            Image.fromarray(smear(side, r)).save(root / label / f"{i}.png")


def test_load_dataset_auto_framing_crops_every_image_alike(tmp_path: Path) -> None:
    _write_smears(tmp_path, {"small": [14, 16, 18, 20, 22], "large": [24, 26, 28, 30, 32]})
    data = load_dataset(tmp_path, 32, 10**7, crop=None)
    assert data.framing.method == "auto" and data.framing.with_nucleus == 10
    assert 0.3 <= data.framing.crop < 1.0
    first = np.asarray(Image.open(Path(data.paths[0])).convert("RGB"))
    assert np.array_equal(data.images[0], square_resize(first, 32, data.framing.crop))
    assert data.summary()["framing"]["crop"] == data.framing.crop
    fixed = load_dataset(tmp_path, 32, 10**7, crop=0.5)
    assert fixed.framing == Framing(0.5, "fixed")
    assert load_dataset(tmp_path, 32, 10**7).framing.crop == 1.0  # the API default: no crop


@pytest.mark.skipif(not PBC.is_dir(), reason="needs ../shared/datasets/pbc")
def test_auto_framing_on_real_pbc_smears() -> None:
    """On real May-Gruenwald-Giemsa cells (360 px images, cells of 100-200 px) the stain rule
    finds a nucleus in every sampled image and frames about the central 60-65%."""
    from leuk_fhir.model.images import decode_image

    paths = sorted(PBC.glob("*/*.jpg"))[::50]
    framing = choose_crop([pad_to_square(decode_image(p, 10**7)) for p in paths])
    assert framing.with_nucleus == framing.sampled == len(paths)
    assert 0.55 <= framing.crop <= 0.75, framing


def test_the_model_file_carries_the_crop_and_the_classifier_applies_it(tmp_path: Path) -> None:
    from leuk_fhir.model.classifier import load_classifier
    from leuk_fhir.model.workflow import synthetic_dataset, train_and_save

    data = synthetic_dataset(8, seed=2, image_size=TINY_CONFIG.image_size, cell_size=64)
    data = dataclasses.replace(data, framing=Framing(0.8, "fixed"))
    pipeline, _, _ = train_and_save(data, tmp_path / "framed.lfm", TINY_CONFIG)
    assert pipeline.config.crop == 0.8  # taken from the dataset, not the config's default
    clf = load_classifier(tmp_path / "framed.lfm", device="cpu")
    assert clf.crop == 0.8
    assert "central 80% kept" in (clf.info.model_card_markdown or "")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(70, 70, 3), dtype=np.uint8) for _ in range(3)]
    framed = clf.run(images).residuals
    clf.crop = 1.0  # the same model fed the crops by hand
    by_hand = clf.run([centre_crop(pad_to_square(im), 0.8) for im in images]).residuals
    assert np.allclose(framed, by_hand, atol=1e-6)
    assert not np.allclose(framed, clf.run(images).residuals, atol=1e-3)


def test_a_model_file_with_an_impossible_crop_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from leuk_fhir.errors import ModelArtifactError
    from leuk_fhir.model.artifact import read_artifact, write_artifact
    from leuk_fhir.model.classifier import load_classifier

    artifact = read_artifact(tiny_model)
    manifest = {
        k: v
        for k, v in artifact.manifest.items()
        if k not in ("entries", "format", "format_version")
    }
    for crop in (0.0, 1.5, -1):
        manifest["preprocessing"] = {**manifest["preprocessing"], "crop": crop}
        write_artifact(tmp_path / "bad.lfm", manifest, artifact.cnn_state, artifact.hosvd_arrays)
        with pytest.raises(ModelArtifactError, match="crop"):
            load_classifier(tmp_path / "bad.lfm", device="cpu")


def test_model_files_without_a_crop_read_as_the_whole_image() -> None:
    from leuk_fhir.model.classifier import load_classifier

    clf = load_classifier()  # the bundled demo model predates framing
    assert clf.crop == 1.0
