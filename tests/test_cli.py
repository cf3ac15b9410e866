"""The CLI surface: --help for every command, --version, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from umm_tools import __version__
from umm_tools.cli import app

runner = CliRunner()


def _commands() -> list[str]:
    import typer.main

    group = typer.main.get_group(app)
    return sorted(group.commands)


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


@pytest.mark.parametrize("command", _commands())
def test_help_for_every_command(command):
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_every_option_has_help():
    """Each generated flag carries its field's description."""
    import typer.main

    group = typer.main.get_group(app)
    for name, cmd in group.commands.items():
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "option" and param.name != "help":
                assert param.help, f"umm {name} {param.opts[0]} has no help text"


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; import umm_tools.cli; "
            "print(','.join(m for m in ('torch','transformers','mergekit','trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported by the CLI at start-up: {out}"
