"""Optional codecs and slide back-ends, reported as plugins.

Each plugin says whether it is usable on this machine and, when it is not, which package to
install (after pydicom's decoder plugins and wsidicom's optional sources). ``leuk-fhir inspect
--plugins`` prints the table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from leuk_fhir.errors import UnsupportedFormatError

#: Transfer syntaxes leuk-fhir reads, with the package whose decoder handles them.
TRANSFER_SYNTAX_PACKAGES: dict[str, str] = {
    ImplicitVRLittleEndian: "pydicom",
    ExplicitVRLittleEndian: "pydicom",
    ExplicitVRBigEndian: "pydicom",
    DeflatedExplicitVRLittleEndian: "pydicom",
    RLELossless: "pylibjpeg-rle",
    JPEGBaseline8Bit: "pylibjpeg-libjpeg",
    JPEGExtended12Bit: "pylibjpeg-libjpeg",
    JPEGLossless: "pylibjpeg-libjpeg",
    JPEGLosslessSV1: "pylibjpeg-libjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg-openjpeg",
    JPEG2000: "pylibjpeg-openjpeg",
}


@dataclass(frozen=True)
class PluginStatus:
    """Availability of one optional capability."""

    name: str
    available: bool
    provides: str
    install_hint: str
    detail: str = ""


def _importable(module: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure means "not available"
        return False, f"{type(exc).__name__}: {exc}"
    return True, str(getattr(mod, "__version__", ""))


@cache
def openslide_status() -> PluginStatus:
    ok, detail = _importable("openslide")
    if ok:
        import openslide

        detail = f"OpenSlide {openslide.__library_version__}"
    return PluginStatus(
        "openslide",
        ok,
        "vendor whole-slide formats (Aperio SVS, generic tiled TIFF, ...)",
        "pip install openslide-python openslide-bin",
        detail,
    )


@cache
def wsidicom_status() -> PluginStatus:
    ok, detail = _importable("wsidicom")
    return PluginStatus(
        "wsidicom",
        ok,
        "DICOM VL Whole Slide Microscopy (multi-instance pyramids)",
        "pip install wsidicom",
        detail,
    )


def decoder_available(transfer_syntax: str) -> bool:
    """True when pydicom has a working decoder for ``transfer_syntax``."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except NotImplementedError:
        return False


def require_transfer_syntax(transfer_syntax: str) -> None:
    """Raise :class:`UnsupportedFormatError` naming the UID unless it can be decoded here."""
    uid = UID(transfer_syntax)
    package = TRANSFER_SYNTAX_PACKAGES.get(uid)
    if package is None:
        raise UnsupportedFormatError(
            f"unsupported DICOM transfer syntax {uid} ({uid.name})",
            hint="send uncompressed, RLE, deflate, JPEG, JPEG-LS or JPEG 2000",
        )
    if not decoder_available(uid):
        raise UnsupportedFormatError(
            f"no decoder installed for DICOM transfer syntax {uid} ({uid.name})",
            hint=f"pip install {package}",
        )


def codec_statuses() -> list[PluginStatus]:
    """One status per transfer syntax family."""
    out: list[PluginStatus] = []
    for uid, package in TRANSFER_SYNTAX_PACKAGES.items():
        out.append(
            PluginStatus(
                f"dicom-{UID(uid).keyword or uid}",
                decoder_available(uid),
                f"DICOM transfer syntax {uid} ({UID(uid).name})",
                f"pip install {package}",
            )
        )
    return out


def all_statuses() -> list[PluginStatus]:
    """Every optional capability with its availability."""
    return [openslide_status(), wsidicom_status(), *codec_statuses()]
