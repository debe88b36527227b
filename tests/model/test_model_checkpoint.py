"""A CNN's training kept as it goes: a stopped training continues to the very same CNN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from leuk_fhir.model.checkpoint import TrainingCheckpoint
from leuk_fhir.model.cnn import CellCNN, CNNConfig, TrainingHistory, train_cnn

EPOCHS = 6


class _Stop(Exception):
    """Stands in for Ctrl-C inside the training loop."""


def _train(
    checkpoint: TrainingCheckpoint | None = None, stop_after: int | None = None
) -> tuple[CellCNN, TrainingHistory, list[int]]:
    """Six epochs on random crops (dropout on, so the global random generator matters too);
    ``stop_after`` raises once that epoch has ended. Returns the epochs reported done."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)
    y = np.arange(40) % 2
    reported: list[int] = []

    def progress(epoch: int, loss: float, accuracy: float) -> None:
        reported.append(epoch)
        if epoch == stop_after:
            raise _Stop

    model, history = train_cnn(
        images,
        y,
        CNNConfig(n_classes=2, widths=(4, 8, 8, 8), feature_grid=2, dropout=0.5),
        np.full(3, 0.5),
        np.full(3, 0.25),
        epochs=EPOCHS,
        seed=3,
        device=torch.device("cpu"),
        batch_size=16,
        learning_rate=1e-2,
        progress=progress,
        precision="fp32",
        checkpoint=checkpoint,
    )
    return model, history, reported


def _same_cnn(a: CellCNN, b: CellCNN) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[CellCNN, TrainingHistory, list[int]]:
    return _train()


def test_a_stopped_training_continues_to_the_same_cnn(
    tmp_path: Path, uninterrupted: tuple[CellCNN, TrainingHistory, list[int]]
) -> None:
    reference, history, _ = uninterrupted
    checkpoint = TrainingCheckpoint(tmp_path / "fold-1.cnn.pt", "job-a", every_s=0.0)
    with pytest.raises(_Stop):
        _train(checkpoint, stop_after=3)
    kept, note = checkpoint.load(EPOCHS)
    assert note is None and kept is not None and kept["epoch"] == 3
    assert checkpoint.resume_note(EPOCHS, "fold 1/5: its CNN") == (
        3,
        f"fold 1/5: its CNN continues from epoch 3 of {EPOCHS}, kept in {checkpoint.path}",
    )

    model, resumed, reported = _train(checkpoint)
    assert reported == list(range(4, EPOCHS + 1))  # it trains only the epochs not kept
    assert _same_cnn(model, reference)
    assert resumed.train_loss == history.train_loss
    assert resumed.train_accuracy == history.train_accuracy
    kept, _ = checkpoint.load(EPOCHS)
    assert kept is not None and kept["epoch"] == EPOCHS  # the last epoch is always written

    # Stopped again with everything trained, it has nothing left to train.
    model, again, _ = _train(checkpoint)
    assert _same_cnn(model, reference) and again.train_loss == history.train_loss


def test_the_stopped_run_differs_without_its_random_state(
    tmp_path: Path, uninterrupted: tuple[CellCNN, TrainingHistory, list[int]]
) -> None:
    """Continuing with the weights alone would not give the same CNN: the rest of the state
    (optimiser, schedule, generators) is what makes the resumed run exact."""
    checkpoint = TrainingCheckpoint(tmp_path / "c.cnn.pt", "job-a", every_s=0.0)
    with pytest.raises(_Stop):
        _train(checkpoint, stop_after=3)
    state: dict[str, Any] = torch.load(checkpoint.path, weights_only=True)
    state["generator"] = torch.Generator().manual_seed(99).get_state()
    torch.save(state, checkpoint.path)
    model, _, _ = _train(checkpoint)
    assert not _same_cnn(model, uninterrupted[0])


def test_a_checkpoint_of_another_job_or_a_damaged_one_is_not_used(
    tmp_path: Path, uninterrupted: tuple[CellCNN, TrainingHistory, list[int]]
) -> None:
    path = tmp_path / "fold-2.cnn.pt"
    with pytest.raises(_Stop):
        _train(TrainingCheckpoint(path, "job-a", every_s=0.0), stop_after=2)

    other = TrainingCheckpoint(path, "job-b", every_s=0.0)
    assert other.load(EPOCHS) == (
        None,
        f"{path} is from another run (other data, settings or "
        "software); training its CNN from the start",
    )
    # Not used, and overwritten by this job's own training, which starts from the beginning.
    model, history, _ = _train(other)
    assert _same_cnn(model, uninterrupted[0]) and len(history.train_loss) == EPOCHS
    assert torch.load(path, weights_only=True)["identity"] == "job-b"

    mine = TrainingCheckpoint(path, "job-b")
    assert mine.load(EPOCHS + 1)[1] == f"{path} is incomplete; training its CNN from the start"

    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a full disk or a crash
    state, note = mine.load(EPOCHS)
    assert state is None and note is not None
    assert note.startswith(f"{path} cannot be read (") and "from the start" in note
    assert mine.resume_note(EPOCHS, "fold 2/5: its CNN") == (None, note)
    model, _, _ = _train(mine)
    assert _same_cnn(model, uninterrupted[0])

    mine.clear()
    assert not path.exists() and mine.load(EPOCHS) == (None, None)


def test_training_goes_on_when_the_checkpoint_cannot_be_written(
    tmp_path: Path,
    uninterrupted: tuple[CellCNN, TrainingHistory, list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    model, _, _ = _train(TrainingCheckpoint(blocked / "fold-1.cnn.pt", "job-a"))
    assert _same_cnn(model, uninterrupted[0])
    assert "training goes on without it" in caplog.text
