"""The CNN's optimiser settings: AdamW's weight decay reaches the weights and the model file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from leuk_fhir.model.cnn import CNNConfig, train_cnn

from .conftest import TINY_CONFIG


def _conv_norm(weight_decay: float) -> float:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 24, 24, 3), dtype=np.uint8)
    y = np.arange(48) % 2
    config = CNNConfig(n_classes=2, widths=(4, 8, 8, 8), feature_grid=2)
    model, _ = train_cnn(
        images,
        y,
        config,
        np.full(3, 0.5),
        np.full(3, 0.25),
        epochs=6,
        seed=1,
        device=torch.device("cpu"),
        batch_size=16,
        learning_rate=1e-2,
        weight_decay=weight_decay,
        precision="fp32",
    )
    convs = [m.weight for m in model.body if isinstance(m, torch.nn.Conv2d)]
    return float(torch.sqrt(sum((w.detach() ** 2).sum() for w in convs)))


def test_weight_decay_shrinks_the_convolutions() -> None:
    # Same seed and data: only the decoupled decay differs, and it pulls every weight to zero.
    assert _conv_norm(5.0) < 0.85 * _conv_norm(0.0)


def test_weight_decay_is_recorded_in_the_model_file_and_its_card(tmp_path) -> None:
    from leuk_fhir.model.artifact import read_artifact
    from leuk_fhir.model.model_card import render_model_card
    from leuk_fhir.model.workflow import synthetic_dataset, train_and_save

    config = replace(TINY_CONFIG, epochs=1, weight_decay=0.02)
    dataset = synthetic_dataset(8, seed=4, image_size=config.image_size, cell_size=64)
    path = tmp_path / "wd.lfm"
    train_and_save(dataset, path, config)
    manifest = read_artifact(path).manifest
    assert manifest["training"]["config"]["weight_decay"] == 0.02
    assert "AdamW weight decay 0.02," in render_model_card(manifest, "0" * 64)
