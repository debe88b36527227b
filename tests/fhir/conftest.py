"""Fixtures for the FHIR mapping and delivery tests: small Findings built in memory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest

from leuk_fhir.acquisition import (
    Acquisition,
    DicomReference,
    Level,
    PatientInfo,
    Scope,
    SpecimenInfo,
    Tile,
)
from leuk_fhir.findings import CellClass, CellFinding, Findings, ModelInfo
from leuk_fhir.settings import FhirSettings, OutboxSettings

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "fhir"


class ArrayPixelSource:
    """A PixelSource over an in-memory RGB array (tests only)."""

    def __init__(self, array: np.ndarray) -> None:
        self._a = array

    @property
    def levels(self) -> tuple[Level, ...]:
        return (Level(self._a.shape[1], self._a.shape[0]),)

    @property
    def frame_count(self) -> int:
        return 1

    @property
    def microns_per_pixel(self) -> float | None:
        return 0.25

    def read_frame(self, index: int = 0) -> np.ndarray:
        return self._a

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        return self._a[y : y + height, x : x + width]

    def iter_tiles(self, tile_size: int, level: int = 0, overlap: int = 0) -> Iterator[Tile]:
        for y in range(0, self._a.shape[0], tile_size):
            for x in range(0, self._a.shape[1], tile_size):
                yield Tile(x, y, 0, self.read_region(x, y, tile_size, tile_size))

    def close(self) -> None:
        pass


CLASSES = (
    CellClass("blast", "Lymphoblast", is_blast=True, snomed_code="15433008", snomed_display="Lymphoblast"),
    CellClass("lymphocyte", "Lymphocyte", snomed_code="56972008", snomed_display="Lymphocyte"),
    CellClass("neutrophil", "Neutrophil", snomed_code="30451008", snomed_display="Neutrophil"),
)


def model_info(version: str = "1.0.0", card: bool = True) -> ModelInfo:
    return ModelInfo(
        name="leuk-hosvd-test", version=version, sha256=hashlib.sha256(version.encode()).hexdigest(),
        classes=CLASSES, metrics={"accuracy_mean": 0.97, "folds": 5.0},
        model_card_markdown="# leuk-hosvd-test\nTest model card." if card else None,
    )


def smear_image(seed: int = 0, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), 225, np.uint8)
    img += rng.integers(0, 20, img.shape, dtype=np.uint8)
    for cy, cx in ((100, 120), (240, 400), (380, 200)):
        yy, xx = np.ogrid[: size[0], : size[1]]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 40**2] = (120, 60, 160)
    return img


def make_findings(
    *,
    seed: int = 0,
    labels: tuple[str, ...] = ("blast", "lymphocyte", "neutrophil"),
    scope: Scope = Scope.FIELD,
    dicom: bool = False,
    patient_id: str | None = "MRN-0001",
    version: str = "1.0.0",
    source_id: str | None = None,
    card: bool = True,
) -> Findings:
    img = smear_image(seed)
    sha = hashlib.sha256(img.tobytes()).hexdigest()
    ref = None
    if dicom:
        ref = DicomReference(study_uid=f"1.2.826.0.1.3680043.8.498.{seed + 1}",
                             series_uid=f"1.2.826.0.1.3680043.8.498.{seed + 1}.1",
                             sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{seed + 1}.1.1",
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.2",
                             accession_number=f"ACC{seed}", modality="SM")
    acq = Acquisition(
        source_id=source_id or (ref.sop_instance_uid if ref else sha),
        pixels=ArrayPixelSource(img),
        scope=scope,
        content_sha256=sha,
        filename=f"smear-{seed}.png",
        media_type="application/dicom" if dicom else "image/png",
        acquired_at=datetime(2026, 11, 20, 9, 30, tzinfo=UTC),
        patient=PatientInfo(identifier=patient_id, name="Doe^Jane", birth_date=date(1980, 2, 3), sex="F")
        if patient_id else PatientInfo(),
        specimen=SpecimenInfo(identifier=f"SP-{seed}", stain="May-Grunwald-Giemsa",
                              collected_at=datetime(2026, 11, 20, 8, 0, tzinfo=UTC)),
        dicom=ref,
    )
    boxes = ((80, 80, 80, 80), (360, 200, 80, 80), (160, 340, 80, 80))
    cells = []
    for i, label in enumerate(labels):
        if label == "indeterminate":
            cells.append(CellFinding(label="indeterminate", probabilities={"blast": 0.4, "lymphocyte": 0.35, "neutrophil": 0.25},
                                     box=boxes[i % 3], indeterminate_reason="residual above threshold"))
        else:
            probs = {c.name: 0.05 for c in CLASSES}
            probs[label] = 0.9
            cells.append(CellFinding(label=label, probabilities=probs,
                                     box=None if scope is Scope.CELL else boxes[i % 3]))
    return Findings(acquisition=acq, model=model_info(version, card), cells=tuple(cells),
                    created_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC))


@pytest.fixture
def fhir_settings() -> FhirSettings:
    return FhirSettings(organization_name="Test Haematology Lab")


@pytest.fixture
def outbox_settings() -> OutboxSettings:
    return OutboxSettings(max_attempts=5, backoff_initial_s=0.05, backoff_max_s=0.5,
                          poll_interval_s=0.05, lease_s=5.0)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def hapi_base(fhir_base: str) -> str:
    """Base URL of the real HAPI FHIR server (the suite's ``fhir_base``, tests/conftest.py)."""
    return fhir_base.rstrip("/")


@pytest.fixture(scope="session")
def rsa_pair() -> tuple[bytes, dict]:
    """An RSA private key (PEM) and its public JWKS with kid ``k1``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from joserfc.jwk import RSAKey

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, {"keys": [{**RSAKey.import_key(pub).as_dict(private=False), "kid": "k1"}]}
