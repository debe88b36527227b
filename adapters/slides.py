"""Whole-slide pyramids: DICOM VL Whole Slide Microscopy (wsidicom) and vendor formats (OpenSlide).

Only headers are parsed when a slide is opened; tiles and regions are decoded on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leuk_fhir.acquisition import Level
from leuk_fhir.adapters._pixels import TiledPixelSource, to_rgb_uint8
from leuk_fhir.adapters.dicom_files import read_dicom
from leuk_fhir.adapters.dicom_metadata import VL_WHOLE_SLIDE_MICROSCOPY
from leuk_fhir.adapters.plugins import openslide_status, require_transfer_syntax, wsidicom_status
from leuk_fhir.errors import InvalidImageError, UnsupportedFormatError


class MissingLevelError(InvalidImageError):
    """A whole-slide pyramid lacks its full-resolution level or tiles of a level."""

    code = "slide-missing-level"


def _is_volume(ds: object) -> bool:
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    return len(image_type) >= 3 and image_type[2] == "VOLUME"


def check_wsi_instances(paths: Sequence[Path]) -> None:
    """Validate a DICOM WSI series before wsidicom opens it.

    Refuses: non-WSI SOP classes, undecodable transfer syntaxes, a pyramid without its
    ORIGINAL full-resolution VOLUME level, and TILED_FULL instances with missing frames.
    """
    if not paths:
        raise InvalidImageError("no DICOM files given for the whole slide")
    volumes = []
    wsi_count = 0
    for path in paths:
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise InvalidImageError(f"{Path(path).name} is not readable DICOM: {exc}") from exc
        if str(ds.get("SOPClassUID", "")) != VL_WHOLE_SLIDE_MICROSCOPY:
            continue  # labels, overviews in other SOP classes are simply not used
        require_transfer_syntax(str(ds.file_meta.TransferSyntaxUID))
        wsi_count += 1
        if not _is_volume(ds):
            continue
        volumes.append(ds)
        organisation = str(ds.get("DimensionOrganizationType", "")).upper()
        if organisation == "TILED_FULL":
            cols, rows = int(ds.Columns), int(ds.Rows)
            total_w = int(ds.TotalPixelMatrixColumns)
            total_h = int(ds.TotalPixelMatrixRows)
            planes = int(ds.get("TotalPixelMatrixFocalPlanes", 1) or 1)
            paths_n = int(ds.get("NumberOfOpticalPaths", 1) or 1)
            expected = -(-total_w // cols) * -(-total_h // rows) * planes * paths_n
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if frames < expected:
                raise MissingLevelError(
                    f"{Path(path).name}: level {total_w} x {total_h} has {frames} of "
                    f"{expected} tiles"
                )
    if not volumes:
        raise MissingLevelError(
            f"none of the {wsi_count} VL Whole Slide Microscopy instance(s) is a pyramid level "
            "(Image Type (0008,0008) value 3 VOLUME is missing)",
            hint="send the slide's VOLUME instances; older converters omit Image Type",
        )
    if not any(str(v.ImageType[0]).upper() == "ORIGINAL" for v in volumes):
        largest = max(int(v.TotalPixelMatrixColumns) for v in volumes)
        raise MissingLevelError(
            f"the slide's full-resolution (ORIGINAL) level is missing; the largest level "
            f"present is {largest} pixels wide and is DERIVED",
            hint="send every instance of the series (all pyramid levels)",
        )


class WsiDicomPixelSource(TiledPixelSource):
    """A DICOM WSI pyramid opened with wsidicom (tiles decoded on demand, cached)."""

    def __init__(self, paths: Sequence[Path], max_pixels: int) -> None:
        status = wsidicom_status()
        if not status.available:
            raise UnsupportedFormatError(
                "DICOM whole-slide support is not installed", hint=status.install_hint
            )
        from wsidicom import WsiDicom

        check_wsi_instances(paths)
        try:
            self._slide = WsiDicom.open([str(p) for p in paths])
        except Exception as exc:
            raise InvalidImageError(f"cannot open the DICOM whole slide: {exc}") from exc
        base = self._slide.levels[0]
        self._wsi_levels = [lvl.level for lvl in self._slide.levels]
        self._levels = tuple(
            Level(lvl.size.width, lvl.size.height, base.size.width / lvl.size.width)
            for lvl in self._slide.levels
        )
        self._max_pixels = max_pixels
        try:
            self._mpp = float(self._slide.mpp.width)
        except Exception:
            self._mpp = None
        self.first_dataset = read_dicom(Path(paths[0]), defer_pixels=True)

    def _read(self, x: int, y: int, width: int, height: int, level: int, frame: int) -> np.ndarray:
        try:
            arr = self._slide.read_region(
                (x, y), self._wsi_levels[level], (width, height), as_array=True
            )
        except Exception as exc:  # a damaged tile: imagecodecs, Pillow, wsidicom errors
            raise InvalidImageError(f"slide region could not be decoded: {exc}") from exc
        return to_rgb_uint8(arr)

    def close(self) -> None:
        self._slide.close()


class OpenSlidePixelSource(TiledPixelSource):
    """A vendor whole-slide file (Aperio SVS, generic tiled TIFF, ...) through OpenSlide."""

    def __init__(self, path: Path, max_pixels: int) -> None:
        status = openslide_status()
        if not status.available:
            raise UnsupportedFormatError(
                "OpenSlide is not installed: vendor whole-slide formats cannot be read",
                hint=status.install_hint,
            )
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise InvalidImageError(f"{Path(path).name}: OpenSlide cannot read it: {exc}") from exc
        self.vendor = openslide.OpenSlide.detect_format(str(path)) or "unknown"
        self.properties = dict(self._slide.properties)
        self._levels = tuple(
            Level(w, h, float(ds))
            for (w, h), ds in zip(
                self._slide.level_dimensions, self._slide.level_downsamples, strict=True
            )
        )
        self._max_pixels = max_pixels
        mpp = self.properties.get(openslide.PROPERTY_NAME_MPP_X)
        try:
            self._mpp = float(mpp) if mpp else None
        except ValueError:
            self._mpp = None

    def _read(self, x: int, y: int, width: int, height: int, level: int, frame: int) -> np.ndarray:
        ds = self._levels[level].downsample
        try:
            region = self._slide.read_region((round(x * ds), round(y * ds)), level, (width, height))
        except Exception as exc:
            raise InvalidImageError(f"slide region could not be decoded: {exc}") from exc
        return to_rgb_uint8(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


def openslide_format(path: Path) -> str | None:
    """OpenSlide's vendor name for ``path`` (e.g. ``aperio``, ``generic-tiff``), None otherwise."""
    if not openslide_status().available:
        return None
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None
