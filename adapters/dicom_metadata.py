"""DICOM attributes -> the neutral metadata of :mod:`leuk_fhir.acquisition`.

Tolerant when reading (PS3.3 modules are often partly filled by microscope software): a
missing or malformed attribute becomes None, never an error.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from leuk_fhir.acquisition import DeviceInfo, DicomReference, PatientInfo, SpecimenInfo

VL_MICROSCOPIC = UID("1.2.840.10008.5.1.4.1.1.77.1.2")
VL_SLIDE_COORDINATES_MICROSCOPIC = UID("1.2.840.10008.5.1.4.1.1.77.1.3")
VL_WHOLE_SLIDE_MICROSCOPY = UID("1.2.840.10008.5.1.4.1.1.77.1.6")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC = UID("1.2.840.10008.5.1.4.1.1.7.4")

#: SOP classes whose instances are analysed frame by frame (a cell or a field per frame).
FRAME_SOP_CLASSES: dict[str, str] = {
    VL_MICROSCOPIC: "VL Microscopic Image",
    VL_SLIDE_COORDINATES_MICROSCOPIC: "VL Slide-Coordinates Microscopic Image",
    SECONDARY_CAPTURE: "Secondary Capture Image (microscope cameras)",
    MULTIFRAME_TRUE_COLOR_SC: "Multi-frame True Color Secondary Capture Image",
}
#: Every SOP class accepted over C-STORE / STOW-RS.
ACCEPTED_SOP_CLASSES: dict[str, str] = {
    **FRAME_SOP_CLASSES,
    VL_WHOLE_SLIDE_MICROSCOPY: "VL Whole Slide Microscopy Image",
}


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value) or None
    text = str(value).strip()
    return text or None


def _date(value: Any) -> date | None:
    text = str(value or "").strip()
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def _datetime(date_value: Any, time_value: Any = None) -> datetime | None:
    d = str(date_value or "").strip()
    t = str(time_value or "").strip().split(".")[0]
    if len(d) < 8:
        return None
    stamp = (d[:8] + t.ljust(6, "0")[:6]) if t else d[:8] + "000000"
    try:
        return datetime.strptime(stamp, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def patient_info(ds: Dataset) -> PatientInfo:
    issuer = _text(ds, "IssuerOfPatientID")
    return PatientInfo(
        identifier=_text(ds, "PatientID"),
        identifier_system=issuer,
        name=_text(ds, "PatientName"),
        birth_date=_date(ds.get("PatientBirthDate")),
        sex=_text(ds, "PatientSex"),
    )


def specimen_info(ds: Dataset) -> SpecimenInfo:
    """Specimen from the Specimen module (PS3.3 C.7.6.22), stain from its preparation steps."""
    identifier = _text(ds, "ContainerIdentifier")
    stain: str | None = None
    specimen_type = "peripheral blood smear"
    for desc in ds.get("SpecimenDescriptionSequence", []) or []:
        identifier = identifier or _text(desc, "SpecimenIdentifier")
        for step in desc.get("SpecimenPreparationSequence", []) or []:
            for item in step.get("SpecimenPreparationStepContentItemSequence", []) or []:
                concept = item.get("ConceptNameCodeSequence")
                meaning = str(concept[0].get("CodeMeaning", "")) if concept else ""
                if "stain" in meaning.lower() or "Using substance" in meaning:
                    codes = item.get("ConceptCodeSequence")
                    if codes:
                        stain = str(codes[0].get("CodeMeaning", "")) or stain
                    elif item.get("TextValue"):
                        stain = str(item.TextValue)
        short = _text(desc, "SpecimenShortDescription")
        if short:
            specimen_type = short
    return SpecimenInfo(identifier=identifier, type=specimen_type, stain=stain)


def device_info(ds: Dataset) -> DeviceInfo:
    return DeviceInfo(
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        serial_number=_text(ds, "DeviceSerialNumber"),
        software_versions=_text(ds, "SoftwareVersions"),
    )


def acquired_at(ds: Dataset) -> datetime | None:
    adt = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if adt:
        return _datetime(adt[:8], adt[8:])
    return (
        _datetime(ds.get("AcquisitionDate"), ds.get("AcquisitionTime"))
        or _datetime(ds.get("ContentDate"), ds.get("ContentTime"))
        or _datetime(ds.get("StudyDate"), ds.get("StudyTime"))
    )


def dicom_reference(ds: Dataset, calling_ae_title: str | None = None) -> DicomReference:
    sop_class = _text(ds, "SOPClassUID")
    if sop_class is None and hasattr(ds, "file_meta"):
        sop_class = _text(ds.file_meta, "MediaStorageSOPClassUID")
    return DicomReference(
        study_uid=_text(ds, "StudyInstanceUID") or "",
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=sop_class,
        accession_number=_text(ds, "AccessionNumber"),
        modality=_text(ds, "Modality"),
        calling_ae_title=calling_ae_title,
    )
