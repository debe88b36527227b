"""A CNN's training state kept on disk as it trains, so that an interrupted training continues.

Finished folds of a cross-validation are kept whole (:mod:`leuk_fhir.model.fold_store`), but
on a CPU without native bfloat16 one PBC fold's CNN trains for about 11 minutes and the CNN of
``train``'s final fit for longer: a stop in the middle of one used to lose it all.
:func:`~leuk_fhir.model.cnn.train_cnn` therefore writes its whole state at the end of an epoch
(the first, then at most every ``every_s`` seconds, and the last): the weights and batch-norm
statistics, the optimiser's moments, the learning-rate schedule, both random generators and
the losses so far. The same job run again continues from the last epoch written, and trains
the CNN an uninterrupted run would have trained, bit for bit.

A checkpoint belongs to one job, named by ``identity`` (the run identity of
:func:`~leuk_fhir.model.fold_store.run_identity` and which fold); another job's file, or a
truncated or foreign one, is not used, with a note saying why. Files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: What a checkpoint holds besides ``identity``; ``cuda_rng`` is present for GPU training only.
STATE_KEYS = (
    "epoch",
    "epochs",
    "model",
    "optimiser",
    "schedule",
    "generator",
    "torch_rng",
    "losses",
    "accuracies",
    "seconds",
)


@dataclass(frozen=True)
class TrainingCheckpoint:
    """Where one CNN training keeps its state, and the job it belongs to."""

    path: Path
    identity: str
    #: least seconds between two writes (each is a few MB; the last epoch is always written)
    every_s: float = 10.0

    def load(self, epochs: int) -> tuple[dict[str, Any] | None, str | None]:
        """The state kept by an earlier run of this job, training for ``epochs``, or None and
        why not (None for both when there is no file)."""
        if not self.path.exists():
            return None, None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  torch raises many kinds for a damaged file
            return None, f"{self.path} cannot be read ({error}); training its CNN from the start"
        if not isinstance(state, dict) or state.get("identity") != self.identity:
            return None, (
                f"{self.path} is from another run (other data, settings or software); "
                "training its CNN from the start"
            )
        missing = [key for key in STATE_KEYS if key not in state]
        epoch = state.get("epoch")
        if (
            missing
            or state.get("epochs") != epochs
            or not isinstance(epoch, int)
            or not 1 <= epoch <= epochs
            or len(state["losses"]) != epoch
        ):
            return None, f"{self.path} is incomplete; training its CNN from the start"
        return state, None

    def resume_note(self, epochs: int, what: str) -> tuple[int | None, str | None]:
        """The epoch ``what`` (say, "fold 2/5: its CNN") continues from and a line saying so,
        or None and why a file is not used (None for both when there is no file)."""
        state, note = self.load(epochs)
        if state is None:
            return None, note
        epoch = int(state["epoch"])
        return epoch, f"{what} continues from epoch {epoch} of {epochs}, kept in {self.path}"

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (a temporary file renamed into place); raises OSError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with partial.open("wb") as handle:
            torch.save({"identity": self.identity, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)

    def clear(self) -> None:
        """Remove the file (once what it was training for is kept, or written)."""
        for path in (self.path, self.path.with_name(self.path.name + ".partial")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
