"""The versioned model file (``.lfm``): a zip of JSON metadata and plain numpy arrays.

Layout::

    manifest.json            format, format_version, name, version, classes (with codes),
                             preprocessing, CNN architecture, HOSVD metadata, training-data
                             fingerprint, metrics, and the SHA-256 of every array entry
    arrays/cnn/<key>.npy     CNN state_dict tensors (saved with allow_pickle=False)
    arrays/hosvd/<key>.npy   HOSVD bases and out-of-distribution thresholds

Nothing is unpickled on load: arrays are read with ``allow_pickle=False`` and checked against
the manifest's digests. Any corrupt, truncated, tampered or incompatible file raises
:class:`~leuk_fhir.errors.ModelArtifactError`. The artifact's own SHA-256 (of the whole file)
identifies the model in reports.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leuk_fhir.errors import ModelArtifactError
from leuk_fhir.findings import CellClass

FORMAT = "leuk-fhir-model"
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)


@dataclass
class ModelArtifact:
    """A loaded model file: its manifest, arrays and file digest."""

    manifest: dict[str, Any]
    cnn_state: dict[str, np.ndarray]
    hosvd_arrays: dict[str, np.ndarray]
    sha256: str

    @property
    def classes(self) -> tuple[CellClass, ...]:
        return tuple(CellClass(**c) for c in self.manifest["classes"])


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_artifact(
    path: Path,
    manifest: dict[str, Any],
    cnn_state: dict[str, np.ndarray],
    hosvd_arrays: dict[str, np.ndarray],
) -> str:
    """Write a model file atomically and return its SHA-256; a file that cannot be written
    raises :class:`ModelArtifactError` and leaves no partial file."""
    entries: dict[str, bytes] = {}
    digests: dict[str, dict[str, Any]] = {}
    for prefix, arrays in (("cnn", cnn_state), ("hosvd", hosvd_arrays)):
        for key, array in arrays.items():
            name = f"arrays/{prefix}/{key}.npy"
            data = _npy_bytes(np.asarray(array))
            entries[name] = data
            digests[name] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "shape": list(np.shape(array)),
                "dtype": str(np.asarray(array).dtype),
            }
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "entries": digests}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(
            tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9
        ) as archive:
            for name, data in [
                (_MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode()),
                *entries.items(),
            ]:
                info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
        tmp.replace(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelArtifactError(
            f"cannot write model file {path}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename else "")
        ) from exc
    finally:
        if tmp.is_file():
            tmp.unlink()


def read_artifact(source: Path | bytes, where: str | None = None) -> ModelArtifact:
    """Read and verify a model file (path or bytes)."""
    where = where or (str(source) if isinstance(source, Path | str) else "model artifact")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ModelArtifactError(f"cannot read model file {where}: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            try:
                manifest = json.loads(archive.read(_MANIFEST))
            except KeyError as exc:
                raise ModelArtifactError(
                    f"{where}: not a leuk-fhir model (no {_MANIFEST})"
                ) from exc
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                found = manifest.get("format") if isinstance(manifest, dict) else manifest
                raise ModelArtifactError(
                    f"{where}: not a leuk-fhir model file (format {found!r:.40})"
                )
            version = manifest.get("format_version")
            if version != FORMAT_VERSION:
                raise ModelArtifactError(
                    f"{where}: model format version {version} is not supported by this leuk-fhir "
                    f"(reads version {FORMAT_VERSION})",
                    hint="retrain the model with this version, or use the leuk-fhir that wrote it",
                )
            cnn: dict[str, np.ndarray] = {}
            hosvd: dict[str, np.ndarray] = {}
            entries = manifest.get("entries")
            if not isinstance(entries, dict) or not all(
                isinstance(meta, dict) for meta in entries.values()
            ):
                raise ModelArtifactError(f"{where}: the manifest's entries are malformed")
            for name, meta in entries.items():
                data = archive.read(name)
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise ModelArtifactError(
                        f"{where}: entry {name} does not match its digest (tampered or corrupt)"
                    )
                array = np.load(io.BytesIO(data), allow_pickle=False)
                key = name.split("/", 2)[2].removesuffix(".npy")
                (cnn if name.startswith("arrays/cnn/") else hosvd)[key] = array
    except ModelArtifactError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        KeyError,
        ValueError,
        TypeError,
        OSError,
    ) as exc:
        raise ModelArtifactError(f"{where}: model file is corrupt or truncated ({exc})") from exc
    for key in ("name", "version", "classes", "preprocessing", "cnn", "hosvd"):
        if key not in manifest:
            raise ModelArtifactError(f"{where}: manifest lacks {key!r}")
    return ModelArtifact(manifest=manifest, cnn_state=cnn, hosvd_arrays=hosvd, sha256=digest)


def class_records(classes: tuple[CellClass, ...]) -> list[dict[str, Any]]:
    return [asdict(c) for c in classes]


def stage_depths_of(cnn_manifest: dict[str, Any]) -> tuple[int, ...]:
    """Convolutions per stage recorded in a model file's ``cnn`` section; files written
    before stage depths existed have one convolution per stage."""
    return tuple(cnn_manifest.get("stage_depths", [1] * len(cnn_manifest["widths"])))
