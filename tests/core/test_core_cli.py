"""The console script: help, version, and the one-line error contract."""

import subprocess
import sys

import pytest

from leuk_fhir import __version__, cli
from leuk_fhir.errors import DatasetError


def test_version_and_help_run_as_a_real_process():
    out = subprocess.run(
        [sys.executable, "-m", "leuk_fhir", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"leuk-fhir {__version__}"
    helptext = subprocess.run(
        [sys.executable, "-m", "leuk_fhir", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "preliminary" in helptext


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_leuk_fhir_errors_become_one_line_and_exit_code(monkeypatch, capsys):
    def failing_handler(args):
        raise DatasetError("class folder 'blast' is empty", hint="add images or remove it")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    p = sub.add_parser("explode")  # type: ignore[attr-defined]
    p.set_defaults(handler=failing_handler)
    assert cli.main(["explode"]) == DatasetError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["leuk-fhir: error: class folder 'blast' is empty (add images or remove it)"]
