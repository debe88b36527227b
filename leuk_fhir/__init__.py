"""leuk-fhir: AI screening of blood-smear images for ALL blasts, reported as HL7 FHIR R4.

Results are decision support: every report names the AI model that made it and stays
``preliminary`` until a clinician signs it off.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

__all__ = ["__version__"]

# In a source checkout, `model/` and `adapters/` sit beside this folder and an install maps them
# to leuk_fhir.model / leuk_fhir.adapters. When this folder is imported straight from the
# checkout (`python -m leuk_fhir` in the repository root shadows a non-editable install), find
# them there too, instead of failing with "No module named 'leuk_fhir.model'".
_here = _Path(__file__).resolve().parent
_checkout = _here.parent
if (
    not (_here / "model").is_dir()
    and (_checkout / "setup.py").is_file()
    and (_checkout / "model" / "__init__.py").is_file()
):
    __path__.append(str(_checkout))
