"""Every positional argument explains itself in `--help` (click 8.5 silently dropped this help
under typer < 0.21, which flwr 1.41 requires; hence the click pin in pyproject.toml)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

runner = CliRunner()


@pytest.mark.parametrize(
    ("cli", "command", "help_text"),
    [
        ("qana", ["info"], "Bundle directory"),
        ("qana-server", ["nodes", "register"], "The clinic's .pub file"),
        ("qana-server", ["nodes", "revoke"], "The clinic id its key was registered under"),
        ("qana-server", ["audit", "show"], "A version id"),
        ("qana-server", ["audit", "diff"], "The earlier version"),
        ("qana-server", ["rollback"], "The version to make current again"),
    ],
)
def test_argument_help_is_shown(cli: str, command: list[str], help_text: str) -> None:
    if cli == "qana":
        from qana.cli import app
    else:
        from server.cli import app
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert help_text in result.output, result.output
