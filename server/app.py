"""The QANA-FL ServerApp, run by Flower's SuperLink (deployment engine) or simulation engine.

All settings come from Flower's run config (the Flower App's `[tool.flwr.app.config]`,
overridden by `flwr run --run-config` / `qana-server start`), so the very same app runs under
`qana-server start` and under the simulation engine. The work is done by
`server.federation.Coordinator` on Flower's Grid and Flower's strategies (with `learning =
"akida-edge"`, by `server.edge_rounds.EdgeCoordinator`: Akida on-chip learning, k-medoids merge);
every new head and backbone version goes into the audit log (`server.audit.AuditLog`).
"""

from __future__ import annotations

from logging import ERROR, INFO

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from server.audit import AuditLog
from server.edge_rounds import EdgeCoordinator, read_run_config
from server.federation import Coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of rounds and record every version in the audit log."""
    settings, edge = read_run_config(context.run_config, run_id=str(context.run_id))
    audit = AuditLog.open(settings.audit_db, settings.audit_key, create=True)
    try:
        # learning = akida-edge: Akida 1.0 on-chip learning of edge neurons (server.edge_rounds)
        coordinator = Coordinator(grid, settings, audit) if edge is None else EdgeCoordinator(grid, settings, audit, edge)
        result = coordinator.run()
    except Exception as exc:
        log(ERROR, "QANA-FL run %s failed: %s", settings.run_id, exc)
        raise
    finally:
        audit.close()
    log(INFO, "QANA-FL run %s finished: head %s -> %s", settings.run_id, result.initial_head_version, result.final_head_version)
