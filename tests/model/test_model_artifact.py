"""The model file: round trip, integrity checks, and the bundled demo model."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from leuk_fhir.errors import ModelArtifactError
from leuk_fhir.findings import ModelInfo
from leuk_fhir.model import load_classifier
from leuk_fhir.model.artifact import FORMAT_VERSION, read_artifact
from leuk_fhir.model.synthetic import generate_cell


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a model zip, passing each (name, bytes) through ``change``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


def test_round_trip_gives_identical_predictions(tiny_model: Path) -> None:
    cells = [generate_cell(k, 100 + i, 96) for i, k in enumerate(["blast", "normal"] * 4)]
    first = load_classifier(tiny_model, device="cpu")
    second = load_classifier(tiny_model, device="cpu")
    a, b = first.run(cells), second.run(cells)
    assert np.array_equal(a.residuals, b.residuals)
    info = first.info
    assert isinstance(info, ModelInfo)
    assert info.name == "tiny-test-model" and info.version == "9.9.9" and not info.is_demo
    assert len(info.sha256) == 64
    assert [c.name for c in info.classes] == ["blast", "normal"]
    assert info.cell_class("blast").is_blast and info.cell_class("normal").snomed_code == "56972008"
    assert info.metrics["train_images"] == 80
    manifest = read_artifact(tiny_model).manifest
    assert manifest["training"]["data"]["fingerprint"]
    assert manifest["format_version"] == FORMAT_VERSION


def test_model_file_holds_no_pickles(tiny_model: Path) -> None:
    with zipfile.ZipFile(tiny_model) as archive:
        for name in archive.namelist():
            if name.endswith(".npy"):
                np.load(
                    io.BytesIO(archive.read(name)), allow_pickle=False
                )  # raises on object arrays


@pytest.mark.parametrize(
    "damage",
    ["truncated", "flipped-bytes", "not-a-zip", "empty"],
)
def test_corrupt_files_raise_model_artifact_error(
    tiny_model: Path, tmp_path: Path, damage: str
) -> None:
    data = tiny_model.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped-bytes":
        middle = len(data) // 2
        data = (
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )
    elif damage == "not-a-zip":
        data = b"hello, I am not a model"
    else:
        data = b""
    path = tmp_path / "bad.lfm"
    path.write_bytes(data)
    with pytest.raises(ModelArtifactError):
        load_classifier(path)


def test_a_flipped_byte_in_compressed_data_is_a_model_artifact_error(
    tiny_model: Path, tmp_path: Path
) -> None:
    raw = bytearray(tiny_model.read_bytes())
    with zipfile.ZipFile(tiny_model) as archive:
        largest = max(archive.infolist(), key=lambda i: i.compress_size)
    start = largest.header_offset + 30 + len(largest.filename.encode()) + len(largest.extra)
    raw[start + 1] ^= 0xFF  # inside the deflate stream: zlib.error, not a CRC mismatch
    path = tmp_path / "zlib.lfm"
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelArtifactError, match="corrupt or truncated"):
        read_artifact(path)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ([1, 2], "not a leuk-fhir model file \\(format \\[1, 2\\]\\)"),
        ("text", "not a leuk-fhir model file"),
        ({"entries": []}, "entries are malformed"),
        ({"entries": {"arrays/cnn/x.npy": "abc"}}, "entries are malformed"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_a_model_artifact_error(
    tiny_model: Path, tmp_path: Path, manifest: object, message: str
) -> None:
    def change(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        if isinstance(manifest, dict):
            return json.dumps({**json.loads(data), **manifest}).encode()
        return json.dumps(manifest).encode()

    with pytest.raises(ModelArtifactError, match=message):
        read_artifact(_rewrite(tiny_model, tmp_path / "shape.lfm", change))


def test_a_model_file_that_cannot_be_written_leaves_no_partial_file(
    tiny_model: Path, tmp_path: Path
) -> None:
    from leuk_fhir.model.artifact import write_artifact

    artifact = read_artifact(tiny_model)
    manifest = {k: v for k, v in artifact.manifest.items() if k != "entries"}
    folder = tmp_path / "model.lfm"
    folder.mkdir()  # the path is a folder: the final rename fails
    with pytest.raises(ModelArtifactError, match="cannot write model file .*model.lfm"):
        write_artifact(folder, manifest, artifact.cnn_state, artifact.hosvd_arrays)
    assert not (tmp_path / "model.lfm.tmp").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelArtifactError, match="cannot write model file"):
        write_artifact(tmp_path / "file" / "m.lfm", manifest, artifact.cnn_state, {})


def test_tampered_entry_is_detected(tiny_model: Path, tmp_path: Path) -> None:
    def change(name: str, data: bytes) -> bytes:
        if name == "arrays/hosvd/ood_thresholds.npy":
            buffer = io.BytesIO()
            np.save(buffer, np.full(2, 99.0), allow_pickle=False)
            return buffer.getvalue()
        return data

    with pytest.raises(ModelArtifactError, match="digest"):
        load_classifier(_rewrite(tiny_model, tmp_path / "tampered.lfm", change))


def test_incompatible_versions_and_foreign_zips_are_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    def newer(name: str, data: bytes) -> bytes:
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["format_version"] = FORMAT_VERSION + 1
            return json.dumps(manifest).encode()
        return data

    with pytest.raises(ModelArtifactError, match="format version 2 is not supported"):
        load_classifier(_rewrite(tiny_model, tmp_path / "newer.lfm", newer))

    def wrong_shape(name: str, data: bytes) -> bytes:
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["cnn"]["widths"] = [4, 4, 4, 4]
            return json.dumps(manifest).encode()
        return data

    with pytest.raises(ModelArtifactError, match="architecture"):
        load_classifier(_rewrite(tiny_model, tmp_path / "shape.lfm", wrong_shape))
    foreign = tmp_path / "foreign.lfm"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelArtifactError, match="no manifest.json"):
        load_classifier(foreign)
    with pytest.raises(ModelArtifactError, match="cannot read"):
        load_classifier(tmp_path / "missing.lfm")


def test_bundled_demo_model_is_small_and_loudly_a_demo() -> None:
    from importlib.resources import files

    resource = files("leuk_fhir").joinpath("data", "demo-model.lfm")
    assert len(resource.read_bytes()) < 5_000_000
    clf = load_classifier(device="cpu")
    assert clf.info.is_demo
    assert "NOT FOR CLINICAL USE" in (clf.info.model_card_markdown or "")
    assert {c.name for c in clf.info.classes} == {"blast", "normal"}
    assert clf.info.cell_class("blast").is_blast
    findings = clf.classify([generate_cell("blast", 7), generate_cell("normal", 8)])
    assert [f.label for f in findings] == ["blast", "normal"]


def test_files_from_before_stage_depths_load_as_one_conv_per_stage(tmp_path: Path) -> None:
    """Model files written before ``stage_depths`` existed (the demo model of release 0.1)
    have no such key and one convolution per stage; they must keep loading unchanged."""
    from leuk_fhir.model.workflow import synthetic_dataset, train_and_save

    from .conftest import TINY_CONFIG

    config = dataclasses.replace(TINY_CONFIG, stage_depths=(1, 1, 1, 1))
    dataset = synthetic_dataset(20, seed=3, image_size=config.image_size, cell_size=96)
    model = tmp_path / "flat.lfm"
    train_and_save(dataset, model, config)
    cells = [generate_cell(k, 50 + i, 96) for i, k in enumerate(["blast", "normal"] * 3)]
    expected = load_classifier(model, device="cpu").run(cells).residuals

    def drop_depths(name: str, data: bytes) -> bytes:
        if name == "manifest.json":
            manifest = json.loads(data)
            del manifest["cnn"]["stage_depths"]
            return json.dumps(manifest).encode()
        return data

    old = load_classifier(_rewrite(model, tmp_path / "old.lfm", drop_depths), device="cpu")
    assert np.array_equal(old.run(cells).residuals, expected)
