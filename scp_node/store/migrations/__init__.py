"""Alembic's revisions of the index schema, configured in code (no alembic.ini).

``scp-node db upgrade`` (:func:`scp_node.store.schema.upgrade`) hands :func:`alembic_config` the
connection of its one transaction; ``env.py`` runs the revisions on it.  Revision files are
``versions/<rev>_<slug>.py`` with plain numbered revisions (0001, 0002, ...): ``0001`` is the
schema the first release created with ``create_all``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config

FOLDER = Path(__file__).parent


def alembic_config(connection: Any) -> Config:
    """Alembic's configuration for the index: this folder's scripts, run on ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(FOLDER))
    cfg.attributes["connection"] = connection
    return cfg
