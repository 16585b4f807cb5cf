"""``scp-node serve``: run the node until SIGTERM / Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from ..logs import configure as setup_logging
from . import config_option, load_config, main

#: Same as scp_node.scheduler.fleet.ROLES (not imported: click builds the choice at import).
ROLES = ("all", "receiver", "worker")


@main.command()
@config_option
@click.option("--role", type=click.Choice(ROLES), default="all", show_default=True,
              help="all: one node does everything. receiver: DIMSE/STOW in and indexed, no model. "
                   "worker: the model, completion, analysis and export, no port. Receivers and "
                   "workers share one PostgreSQL index and one storage folder.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (pynetdicom PDUs included).")
def serve(config_path: Path, role: str, verbose: bool) -> None:
    """Receive, analyse and return SRs until stopped (SIGTERM or Ctrl-C stop it cleanly)."""
    setup_logging(verbose)
    config = load_config(config_path)
    from ..node import Node, StartupError, check_role

    try:
        check_role(role, config.store.database_url)  # before the index is opened
    except StartupError as exc:
        click.echo(f"scp-node: cannot start: {exc}", err=True)
        sys.exit(2)
    node = Node(config, role=role)
    try:
        node.start()
    except StartupError as exc:
        click.echo(f"scp-node: cannot start: {exc}", err=True)
        node.stop()
        sys.exit(2)
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if node.receives:
        click.echo(f"scp-node listening as {config.node.ae_title} on {config.node.host}:{config.node.port}"
                   + ("" if role == "all" else f" (role {role}, {node.name})"), err=True)
    else:
        click.echo(f"scp-node worker running as {node.name}", err=True)
    while not done.wait(1.0):
        pass
    click.echo("scp-node stopping", err=True)
    node.stop()
