"""leuk-fhir: AI screening of blood-smear images for ALL blasts, reported as HL7 FHIR R4.

Results are decision support: every report names the AI model that made it and stays
``preliminary`` until a clinician signs it off.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
