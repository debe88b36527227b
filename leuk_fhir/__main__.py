import sys

from leuk_fhir.cli import main

# Guarded: worker processes (``evaluate`` runs folds in parallel) import this module again.
if __name__ == "__main__":
    sys.exit(main())
