"""The DICOMweb ASGI app: routes under ``/dicom-web``, bearer auth in front of all of them."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from ..audit import AuditTrail
from ..config import WebConfig
from ..store.db import Database
from ..store.ingest import Ingestor
from . import qido, stow, wado
from .auth import BearerAuth
from .catalog import Catalog
from .context import WebContext

ROOT = "/dicom-web"
_UID = "{%s:str}"


def _p(*parts: str) -> str:
    out = ROOT
    for part in parts:
        name = part.strip("{}")
        out += f"/{part}" if not part.startswith("{") else "/" + _UID % name
    return out


def routes() -> list[Route]:
    st, se, inst = "{study}", "{series}", "{instance}"
    return [
        # STOW-RS
        Route(_p("studies"), stow.store_instances, methods=["POST"]),
        Route(_p("studies", st), stow.store_instances, methods=["POST"]),
        # QIDO-RS
        Route(_p("studies"), qido.search_studies, methods=["GET"]),
        Route(_p("series"), qido.search_series, methods=["GET"]),
        Route(_p("instances"), qido.search_instances, methods=["GET"]),
        Route(_p("studies", st, "series"), qido.search_series, methods=["GET"]),
        Route(_p("studies", st, "instances"), qido.search_instances, methods=["GET"]),
        Route(_p("studies", st, "series", se, "instances"), qido.search_instances, methods=["GET"]),
        # WADO-RS
        Route(_p("studies", st), wado.retrieve, methods=["GET"]),
        Route(_p("studies", st, "series", se), wado.retrieve, methods=["GET"]),
        Route(_p("studies", st, "series", se, "instances", inst), wado.retrieve, methods=["GET"]),
        Route(_p("studies", st, "metadata"), wado.metadata, methods=["GET"]),
        Route(_p("studies", st, "series", se, "metadata"), wado.metadata, methods=["GET"]),
        Route(_p("studies", st, "series", se, "instances", inst, "metadata"), wado.metadata, methods=["GET"]),
    ]


def create_app(web: WebConfig, db: Database, audit: AuditTrail, ingestor: Ingestor, spool_dir: Path) -> Starlette:
    """The app over the node's own database, ingestor and audit trail (nothing is opened twice)."""
    app = Starlette(routes=routes(), middleware=[Middleware(BearerAuth, hashes=web.token_sha256, audit=audit)])
    app.state.ctx = WebContext(ingestor=ingestor, audit=audit, catalog=Catalog(db, ingestor.storage_dir),
                               web=web, spool_dir=spool_dir)
    return app
