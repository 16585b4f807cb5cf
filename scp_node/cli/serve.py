"""``scp-node serve``: run the node until SIGTERM / Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from ..logs import configure as setup_logging
from . import config_option, load_config, main


@main.command()
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (pynetdicom PDUs included).")
def serve(config_path: Path, verbose: bool) -> None:
    """Receive, analyse and return SRs until stopped (SIGTERM or Ctrl-C stop it cleanly)."""
    setup_logging(verbose)
    config = load_config(config_path)
    from ..node import Node, StartupError

    node = Node(config)
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
    click.echo(f"scp-node listening as {config.node.ae_title} on {config.node.host}:{config.node.port}", err=True)
    while not done.wait(1.0):
        pass
    click.echo("scp-node stopping", err=True)
    node.stop()
