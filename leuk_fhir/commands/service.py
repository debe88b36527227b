"""`leuk-fhir` sub-commands of the service family."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this family's sub-commands."""
