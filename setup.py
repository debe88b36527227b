"""Package discovery for the layout in pyproject.toml (all metadata lives there).

``model/`` and ``adapters/`` sit at the repository root for readers of the code, and are
installed as ``leuk_fhir.model`` and ``leuk_fhir.adapters``.
"""

from setuptools import find_namespace_packages, find_packages, setup

MAPPED = {"leuk_fhir.model": "model", "leuk_fhir.adapters": "adapters"}

# Namespace discovery so data folders (leuk_fhir/data, service/static) ship as package data.
packages = [
    "leuk_fhir",
    *(f"leuk_fhir.{p}" for p in find_namespace_packages("leuk_fhir", exclude=["*__pycache__*"])),
]
package_dir = {"leuk_fhir": "leuk_fhir"}
for name, folder in MAPPED.items():
    package_dir[name] = folder
    packages += [name, *(f"{name}.{p}" for p in find_packages(folder))]

setup(packages=packages, package_dir=package_dir)
