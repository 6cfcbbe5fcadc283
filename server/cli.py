"""``qana-server``: the coordinator's command line.

Sub-commands are registered here; each lives with the code it drives
(``server/audit/cli.py`` for the audit log and rollbacks).
"""

from __future__ import annotations

import typer

from server.audit.cli import audit_app, rollback_command

app = typer.Typer(
    name="qana-server",
    no_args_is_help=True,
    help="QANA-FL coordinator: runs the federation and keeps the signed audit log of model versions.",
)
app.add_typer(audit_app, name="audit")
app.command("rollback")(rollback_command)

if __name__ == "__main__":
    app()
