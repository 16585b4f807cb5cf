"""``scp-node status``: running or not, port, queue depths, last errors."""

from __future__ import annotations

from pathlib import Path

import click

from . import config_option, load_config, main


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path, as_json: bool) -> None:
    """Show whether the node runs and what is queued or failed (exit 1 when not running)."""
    from ..monitor import collect, render
    from ..store.db import Database

    config = load_config(config_path)
    st = collect(config, Database(config.store.database_url))
    click.echo(st.to_json() if as_json else render(st))
    raise SystemExit(0 if st.running else 1)
