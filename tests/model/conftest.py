"""Fixtures for the model tests: synthetic cell folders and one tiny trained model file."""

from __future__ import annotations

from pathlib import Path

import pytest

from leuk_fhir.model.synthetic import write_synthetic_dataset
from leuk_fhir.model.training import TrainingConfig

#: Small and fast: a few epochs at 32 px are enough for the synthetic classes.
TINY_CONFIG = TrainingConfig(
    image_size=32, epochs=3, batch_size=32, widths=(8, 16, 24, 32), feature_grid=2, seed=0
)


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder dataset of 24 synthetic cells per class (96 px PNGs)."""
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic") / "cells", per_class=24, seed=11, size=96
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file trained on synthetic cells with the tiny configuration."""
    from leuk_fhir.model.workflow import synthetic_dataset, train_and_save

    path = tmp_path_factory.mktemp("models") / "tiny.lfm"
    dataset = synthetic_dataset(40, seed=5, image_size=TINY_CONFIG.image_size, cell_size=96)
    train_and_save(dataset, path, TINY_CONFIG, name="tiny-test-model", version="9.9.9")
    return path
