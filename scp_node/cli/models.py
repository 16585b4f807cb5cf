"""``scp-node make-test-model``: the tiny random model of the MedGemma architecture."""

from __future__ import annotations

from pathlib import Path

import click

from . import main


@main.command("make-test-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Random seed for the weights.")
def make_test_model_cmd(directory: Path, seed: int) -> None:
    """Write a tiny, randomly initialised TEST model (no download) into DIRECTORY.

    Everything the node produces with it is labelled as coming from a test model.
    """
    from ..engine.testmodel import make_test_model

    make_test_model(directory, seed=seed)
    click.echo(f"test model written to {directory} (random weights: for tests and demos only)")
