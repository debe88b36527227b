"""Finished cross-validation folds kept on disk, so that an interrupted ``evaluate`` continues.

The PBC 5-fold evaluation takes about an hour on a 2-core CPU without native bfloat16. When it
stops (Ctrl-C, a closed terminal, a reboot), the folds that finished are not lost: each is
written to ``OUT/folds/fold-N.npz`` as it ends, and the same command run again reuses them and
trains only the rest. A fold file is reused only when it comes from the same run: the
:func:`run_identity` it was written under (a SHA-256 of the decoded crops, labels, splits,
training settings, software versions and arithmetic) must match, and its arrays must have the
shapes of that fold. Anything else (another run's file, a truncated or foreign file) is set
aside with a note and the fold is trained again; a fold's result depends only on its seed, so
a resumed run writes the report an uninterrupted one would. The files hold arrays and JSON
text only (read with ``allow_pickle=False``). The fold in progress keeps its CNN's training
state beside them (``fold-N.cnn.pt``, :mod:`leuk_fhir.model.checkpoint`), so that it continues
from its last epoch rather than from the start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from leuk_fhir.model.checkpoint import TrainingCheckpoint
from leuk_fhir.model.training import HeadOutput

#: Ending of the CNN training states kept beside the folds (:mod:`leuk_fhir.model.checkpoint`).
CHECKPOINT_SUFFIX = ".cnn.pt"
#: Packages whose versions can change a fold's numbers.
_PACKAGES = ("leuk-fhir", "torch", "numpy", "scipy", "scikit-learn", "tensorly")


@dataclass
class FoldOutcome:
    """One fold's result: its report record, every head's answers on the held-out cells and
    which of them the HOSVD head called indeterminate."""

    record: dict[str, Any]
    outputs: dict[str, HeadOutput]
    indeterminate: np.ndarray


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_identity(
    arrays: list[np.ndarray | None],
    splits: list[tuple[np.ndarray, np.ndarray]],
    settings: dict[str, Any],
) -> str:
    """SHA-256 of what every fold's numbers depend on: ``arrays`` (the decoded crops, labels,
    sub-class labels, groups: exactly what the CNN and the heads see), the splits, and
    ``settings`` (training settings, machine, arithmetic; JSON-serialisable), plus the versions
    of the packages that compute them."""
    digest = hashlib.sha256()
    header = {"settings": settings, "versions": {p: _version(p) for p in _PACKAGES}}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        array = np.ascontiguousarray(array)
        if array.dtype.kind in "OUS":  # group or label names
            digest.update("\0".join(map(str, array.tolist())).encode() + b"\1")
        else:
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.data)
    for train, test in splits:
        digest.update(np.asarray(train, dtype=np.int64).tobytes() + b"|")
        digest.update(np.asarray(test, dtype=np.int64).tobytes() + b"/")
    return digest.hexdigest()


class FoldStore:
    """``folder/fold-N.npz`` files for the folds of the run named by ``identity``."""

    def __init__(self, folder: Path, identity: str) -> None:
        self.folder = Path(folder)
        self.identity = identity

    def path(self, index: int) -> Path:
        """File of fold ``index`` (0-based; the file name counts from 1, as reports do)."""
        return self.folder / f"fold-{index + 1}.npz"

    def checkpoint(self, index: int) -> TrainingCheckpoint:
        """Where fold ``index``'s CNN keeps its training state until the fold is kept."""
        return TrainingCheckpoint(
            self.folder / f"fold-{index + 1}{CHECKPOINT_SUFFIX}",
            f"{self.identity}/fold-{index + 1}",
        )

    def save(self, index: int, outcome: FoldOutcome) -> Path:
        """Write fold ``index`` atomically (a temporary file renamed into place); its CNN's
        training state is no longer needed then."""
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {  # Any: numpy's stub reads a key as savez's allow_pickle
            "identity": np.array(self.identity),
            "record": np.array(json.dumps(outcome.record)),
            "indeterminate": np.asarray(outcome.indeterminate, dtype=bool),
        }
        for head, output in outcome.outputs.items():
            arrays[f"predicted_{head}"] = np.asarray(output.predicted)
            arrays[f"scores_{head}"] = np.asarray(output.scores)
        target = self.path(index)
        partial = target.with_name(target.name + ".partial")
        with partial.open("wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
        self.checkpoint(index).clear()
        return target

    def load(
        self, index: int, test_size: int, n_classes: int
    ) -> tuple[FoldOutcome | None, str | None]:
        """Fold ``index`` as kept by an earlier run of this one, or None and why not (None for
        both when there is no file)."""
        path = self.path(index)
        if not path.exists():
            return None, None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["identity"]) != self.identity:
                    return None, (
                        f"{path} is from another run (other data, settings or software); "
                        "training that fold again"
                    )
                record = json.loads(str(data["record"]))
                indeterminate = np.asarray(data["indeterminate"], dtype=bool)
                heads = [
                    n.removeprefix("predicted_") for n in data.files if n.startswith("predicted_")
                ]
                outputs = {
                    h: HeadOutput(
                        np.asarray(data[f"predicted_{h}"]), np.asarray(data[f"scores_{h}"])
                    )
                    for h in heads
                }
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
            return None, f"{path} cannot be read ({error}); training that fold again"
        shapes_fit = (
            isinstance(record, dict)
            and record.get("fold") == index + 1
            and indeterminate.shape == (test_size,)
            and outputs
            and all(
                o.predicted.shape == (test_size,) and o.scores.shape == (test_size, n_classes)
                for o in outputs.values()
            )
        )
        if not shapes_fit:
            return None, f"{path} does not fit fold {index + 1}; training that fold again"
        return FoldOutcome(record, outputs, indeterminate), None


def clear_folds(folder: Path) -> None:
    """Remove the fold files and CNN training states in ``folder`` (and the folder, when nothing
    else is in it): once the report or model that holds them is written, or when the user asks
    for a fresh run."""
    folder = Path(folder)
    for pattern in ("fold-*.npz*", f"*{CHECKPOINT_SUFFIX}*"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (files that are not ours) or not there
        folder.rmdir()
