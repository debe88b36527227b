"""Code systems and codes used by the FHIR mapping, each with its system URL.

LOINC and SNOMED CT codes are the ones listed in ``shared/REFERENCES.md``; local concepts
(probabilities, cell counts, model identity) use ``urn:leuk-fhir:*`` systems so that nothing
pretends to be a standard code when it is not.
"""

from __future__ import annotations

import enum
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
RFC3986 = "urn:ietf:rfc:3986"
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
DOCUMENT_TYPE_LOCAL = "urn:leuk-fhir:document-type"

#: Local systems (not standard terminologies).
LOCAL_OBSERVATION = "urn:leuk-fhir:observation"
LOCAL_MODEL = "urn:leuk-fhir:model"
LOCAL_DEVICE_TYPE = "urn:leuk-fhir:device-type"
MODEL_SHA256_SYSTEM = "urn:leuk-fhir:model-sha256"
ORGANIZATION_SYSTEM = "urn:leuk-fhir:organization"
MEDIA_SYSTEM = "urn:leuk-fhir:media"
SPECIMEN_SYSTEM = "urn:leuk-fhir:specimen"
OBSERVATION_SYSTEM = "urn:leuk-fhir:observation-id"
MODEL_CARD_SYSTEM = "urn:leuk-fhir:model-card"
PRACTITIONER_SYSTEM = "urn:leuk-fhir:practitioner"


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    """A FHIR ``Coding`` as JSON."""
    out: dict[str, Any] = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def concept(system: str, code: str, display: str | None = None, text: str | None = None) -> dict:
    """A FHIR ``CodeableConcept`` with one coding."""
    out: dict[str, Any] = {"coding": [coding(system, code, display)]}
    if text:
        out["text"] = text
    return out


#: HL7 AI Transparency IG: ``meta.security`` label for AI-asserted content.
AI_ASSERTED_LABEL = coding(V3_OBSERVATION_VALUE, "AIAST", "Artificial Intelligence asserted")


class ReportCode(enum.Enum):
    """LOINC codes of the report and its observations (``DiagnosticReport.code``, ``Observation.code``)."""

    SMEAR_MORPHOLOGY_PANEL = ("34994-4", "Smear morphology panel - Blood")
    BLOOD_SMEAR_FINDING = ("5909-7", "Blood smear finding")
    BLASTS_PER_100_LEUKOCYTES = ("26446-5", "Blasts/100 leukocytes in Blood")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def display(self) -> str:
        return self.value[1]

    def concept(self) -> dict[str, Any]:
        return concept(LOINC, self.code, self.display, text=self.display)


class ConclusionCode(enum.Enum):
    """SNOMED CT codes for ``DiagnosticReport.conclusionCode``."""

    ACUTE_LYMPHOID_LEUKEMIA = ("91857003", "Acute lymphoid leukemia (disorder)")
    NO_ABNORMALITY = ("281900007", "No abnormality detected (finding)")

    def concept(self) -> dict[str, Any]:
        return concept(SNOMED, self.value[0], self.value[1])


#: SNOMED CT 119297000 "Blood specimen (specimen)".
BLOOD_SPECIMEN = concept(SNOMED, "119297000", "Blood specimen (specimen)", text="peripheral blood smear")
