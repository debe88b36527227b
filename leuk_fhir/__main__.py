import sys

from leuk_fhir.cli import main

sys.exit(main())
