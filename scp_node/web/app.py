"""The DICOMweb ASGI app: routes under ``/dicom-web``, bearer auth in front of all of them.

With ``[web] cors_origins``, CORS sits in front of the bearer auth: a browser's preflight
(``OPTIONS`` with no token: browsers never send one there) is answered for those origins only,
and every other request still needs its token.
"""

from __future__ import annotations

import re
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
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
        Route(_p("studies", st, "series", se, "instances", inst, "frames") + "/{frames}", wado.frames,
              methods=["GET"]),
        Route(_p("studies", st, "series", se, "instances", inst, "bulkdata") + "/{path:path}", wado.bulkdata,
              methods=["GET"]),
    ]


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def cors(origins: tuple[str, ...]) -> list[Middleware]:
    """The CORS layer for ``[web] cors_origins`` (none: no layer, no CORS header is ever sent).

    Origins are exact ``scheme://host[:port]``; ``*`` is refused (any web page could then use a
    token it holds).  Only what a DICOMweb viewer needs is allowed: GET/POST, the Authorization,
    Accept and Content-Type headers; Warning and Content-Type are readable by the page.
    """
    if not origins:
        return []
    bad = [o for o in origins if not _ORIGIN.fullmatch(o)]
    if bad:
        from .server import WebStartError

        raise WebStartError(f"[web] cors_origins: {len(bad)} entries are not scheme://host[:port] "
                            "(no path, no trailing slash, no '*')")
    return [Middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Accept", "Content-Type"],
                       expose_headers=["Warning", "Content-Type", "Content-Length"], max_age=600)]


def create_app(web: WebConfig, db: Database, audit: AuditTrail, ingestor: Ingestor, spool_dir: Path) -> Starlette:
    """The app over the node's own database, ingestor and audit trail (nothing is opened twice)."""
    app = Starlette(routes=routes(), middleware=[*cors(web.cors_origins),
                                                 Middleware(BearerAuth, hashes=web.token_sha256, audit=audit)])
    app.state.ctx = WebContext(ingestor=ingestor, audit=audit, catalog=Catalog(db, ingestor.storage_dir),
                               web=web, spool_dir=spool_dir)
    return app
