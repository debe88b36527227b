"""Sub-command families of the ``leuk-fhir`` console script."""
