"""The ``scp-node`` command line (click)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import __version__
from ..config import Config, ConfigError, load

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             required=True, help="TOML configuration file.")


def load_config(path: Path) -> Config:
    """Load the config or exit 2 with the reason."""
    try:
        return load(path)
    except ConfigError as exc:
        click.echo(f"scp-node: {exc}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="scp-node")
def main() -> None:
    """scp_node: a DICOM node that analyses series with MedGemma and returns SRs to the PACS."""


from . import analyze, audit, db, exports, models, serve, status  # noqa: E402,F401  (registers the commands)
