"""The console script: help, version, and the one-line error contract."""

import argparse
import os
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


def _with_handler(monkeypatch, handler):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.add_parser("probe").set_defaults(handler=handler)  # type: ignore[attr-defined]


def test_keyboard_interrupt_is_one_line_and_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    _with_handler(monkeypatch, interrupted)
    assert cli.main(["probe"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["leuk-fhir: interrupted"]


def test_broken_pipe_in_a_handler_is_quiet(monkeypatch, capsys):
    def closed_reader(args):
        raise BrokenPipeError(32, "Broken pipe")

    _with_handler(monkeypatch, closed_reader)
    assert cli.main(["probe"]) == cli.EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_closed_stdout_pipe_gives_no_traceback_in_a_real_process():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, like `| head -c 0`
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "leuk_fhir", "inspect", "--plugins", "--json"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert proc.returncode == cli.EXIT_BROKEN_PIPE


def _commands(parser):
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, child in sub.choices.items():
        yield [name]
        for action in child._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ([name, nested] for nested in action.choices)


@pytest.mark.parametrize("words", list(_commands(cli.build_parser())), ids=" ".join)
def test_every_sub_command_has_working_help(words, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*words, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: leuk-fhir")


@pytest.mark.parametrize("argv", [["bogus"], ["analyze"], ["pull", "--study", "1.2"]])
def test_unknown_command_and_missing_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_configuration_error_exits_2_with_one_line(tmp_path, capsys):
    config = tmp_path / "leuk.toml"
    config.write_text("[image]\nmax_pixels = 0\n")
    assert cli.main(["--config", str(config), "inspect", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image.max_pixels" in err[0]


def test_a_full_disk_is_one_line_and_exit_6(small_disk, capsys) -> None:
    """Any command writing to a full disk (a real tmpfs) says so in one line, no traceback."""
    small_disk.fill(leave=0)
    assert cli.main(["sample-image", str(small_disk.path / "cell.png")]) == 6
    err = capsys.readouterr().err
    assert err.startswith("leuk-fhir: error: no space left on the disk") and "Traceback" not in err
    assert err.count("\n") == 1
    # the model commands name the file they could not write (exit 3), as before
    assert cli.main(["model-card", "--out", str(small_disk.path / "card.md")]) == 3
    assert "No space left on device" in capsys.readouterr().err
