"""``scp-node exports retry``: queue dead exports again once the destination is back."""

from __future__ import annotations

from pathlib import Path

import click

from . import config_option, load_config, main


@main.group()
def exports() -> None:
    """Inspect and retry SR exports."""


@exports.command("retry")
@config_option
@click.option("--destination", default=None, help="Only this destination (name from the config).")
def retry(config_path: Path, destination: str | None) -> None:
    """Give every dead export a fresh set of attempts."""
    from ..runtime import open_database
    from ..scheduler.exports import retry_dead

    db, audit = open_database(load_config(config_path))
    n = retry_dead(db, audit, destination)
    click.echo(f"{n} dead export(s) queued again")
