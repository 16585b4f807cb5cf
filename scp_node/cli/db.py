"""``scp-node db upgrade`` / ``scp-node db current``: the index schema (Alembic's revisions).

``serve`` refuses to start on an index whose schema is behind this scp_node's; ``db upgrade``
brings it to head in one transaction.  Back the index up first (a copy of the SQLite file, or
``pg_dump``): an upgrade is not undone by installing the older scp_node again.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import config_option, load_config, main

log = logging.getLogger(__name__)


@main.group()
def db() -> None:
    """The index database's schema."""


@db.command("upgrade")
@config_option
@click.option("--revision", default="head", show_default=True, help="Upgrade to this revision.")
def upgrade(config_path: Path, revision: str) -> None:
    """Bring the index schema to this scp_node's revision (stop the node and back up the index first)."""
    from ..runtime import node_running
    from ..store.db import Database
    from ..store.schema import SchemaError, upgrade as run_upgrade

    config = load_config(config_path)
    if node_running(config):
        click.echo(f"scp-node: a node is running with the storage in {config.var_dir}; stop it before "
                   "upgrading the index", err=True)
        sys.exit(2)
    database = Database(config.store.database_url)
    try:
        before, after = run_upgrade(database, revision)
    except SchemaError as exc:
        click.echo(f"scp-node: {exc}", err=True)
        sys.exit(2)
    finally:
        database.dispose()
    if before == after:
        click.echo(f"index schema already at revision {after}")
    elif before is None:
        click.echo(f"index created at revision {after}")
    else:
        click.echo(f"index schema upgraded from revision {before} to {after}")


@db.command("current")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def current(config_path: Path, as_json: bool) -> None:
    """Show the index schema's revision and this scp_node's (exit 1 when an upgrade is due)."""
    from ..store.db import Database
    from ..store.schema import SchemaError, describe, upgrade_command

    config = load_config(config_path)
    database = Database(config.store.database_url)
    try:
        info = describe(database)
    except SchemaError as exc:
        click.echo(f"scp-node: {exc}", err=True)
        sys.exit(2)
    finally:
        database.dispose()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        note = "" if info["up_to_date"] else f"  (run `{upgrade_command(config.source)}`)"
        click.echo(f"index schema {info['current']}, this scp_node {info['head']}{note}")
    raise SystemExit(0 if info["up_to_date"] else 1)
