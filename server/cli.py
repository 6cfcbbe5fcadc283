"""``qana-server``: the coordinator's command line.

Sub-commands are registered here; each lives with the code it drives
(``server/audit/cli.py`` for the audit log and rollbacks).
"""

from __future__ import annotations

import typer

from server.audit.cli import audit_app, rollback_command
from server.federation_cli import (
    certs_command,
    nodes_app,
    start_command,
    status_command,
)

app = typer.Typer(
    pretty_exceptions_show_locals=False,  # a bug's traceback must not print clinic data or keys
    name="qana-server",
    no_args_is_help=True,
    help="QANA-FL coordinator: runs the federation and keeps the signed audit log of model versions.",
)
app.add_typer(audit_app, name="audit")
app.command("rollback")(rollback_command)
app.command("start")(start_command)
app.command("certs")(certs_command)
app.add_typer(nodes_app, name="nodes")
app.command("status")(status_command)

if __name__ == "__main__":
    app()
