"""DICOMweb (STOW-RS, QIDO-RS, WADO-RS) over the node's store, served by uvicorn in the node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .app import create_app
from .auth import token_sha256
from .server import WebServer, WebStartError

if TYPE_CHECKING:
    from ..audit import AuditTrail
    from ..config import Config
    from ..store.db import Database
    from ..store.ingest import Ingestor

__all__ = ["WebServer", "WebStartError", "create_app", "start_web", "token_sha256"]


def start_web(config: "Config", db: "Database", audit: "AuditTrail", ingestor: "Ingestor") -> WebServer:
    """Start the DICOMweb service for ``config.web`` (must be set); raises WebStartError."""
    assert config.web is not None
    app = create_app(config.web, db, audit, ingestor, spool_dir=config.var_dir / "web-spool")
    server = WebServer(app, config.web)
    server.start()
    return server
