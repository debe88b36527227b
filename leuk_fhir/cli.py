"""The ``leuk-fhir`` console script.

Each family of sub-commands lives in ``leuk_fhir/commands/<family>.py`` with a
``register(subparsers)`` function; handlers import heavy libraries lazily so ``--help`` stays
fast. Errors derived from :class:`~leuk_fhir.errors.LeukFhirError` become one clear line on
stderr and the error's exit code.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from leuk_fhir import __version__
from leuk_fhir.commands import adapters as adapters_commands
from leuk_fhir.commands import fhir as fhir_commands
from leuk_fhir.commands import model as model_commands
from leuk_fhir.commands import service as service_commands
from leuk_fhir.errors import LeukFhirError, StorageFullError, is_storage_full

COMMAND_FAMILIES = (model_commands, fhir_commands, adapters_commands, service_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leuk-fhir",
        description="Screen blood-smear images for ALL blasts and report to EHRs as FHIR R4. "
        "Decision support only: results stay preliminary until a clinician signs them off.",
    )
    parser.add_argument("--version", action="version", version=f"leuk-fhir {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (see docs/configuration.md)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for family in COMMAND_FAMILIES:
        family.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.handler(args) or 0)
        # Flush here, not at interpreter exit, so a reader that went away is handled below.
        sys.stdout.flush()
        return code
    except LeukFhirError as exc:
        print(f"leuk-fhir: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("leuk-fhir: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (``leuk-fhir analyze --json | head``): stop quietly,
        # like a tool killed by SIGPIPE, without a traceback or a failed flush at exit.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (OSError, sqlite3.OperationalError) as exc:  # after BrokenPipeError, an OSError
        if not is_storage_full(exc):
            raise
        where = getattr(exc, "filename", None)
        print(
            f"leuk-fhir: error: no space left on the disk{f' for {where}' if where else ''}: "
            "free space, then run the command again (evaluate continues from the folds it "
            "finished)",
            file=sys.stderr,
        )
        return StorageFullError.exit_code


#: 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is not a real file (captured in tests): nothing left to flush


if __name__ == "__main__":
    sys.exit(main())
