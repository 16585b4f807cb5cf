"""Bearer tokens for every DICOMweb route; the config keeps only their SHA-256.

A pure ASGI middleware in front of the whole app, so no route can be added without it.  Tokens
are compared as SHA-256 digests in constant time; a refusal is audited with the client address
and the request path (never the token, never the query string, which may carry a PatientID).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Iterable

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from ..audit import AuditTrail, Event
from .media import DicomJSONResponse

log = logging.getLogger(__name__)


def token_sha256(token: str) -> str:
    """What goes into ``[web] token_sha256`` for a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class BearerAuth:
    """Lets a request through only with ``Authorization: Bearer <token>`` of a configured hash."""

    def __init__(self, app: ASGIApp, hashes: Iterable[str], audit: AuditTrail) -> None:
        self.app = app
        self.hashes = [bytes.fromhex(h) for h in hashes]
        self.audit = audit

    def _valid(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        ok = False
        for h in self.hashes:  # no early exit: the time does not tell which hash came close
            ok |= hmac.compare_digest(digest, h)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if self._valid(header):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = client[0] if client else ""
        why = "missing" if not header else "invalid"
        path = str(scope.get("path", ""))[:200]
        log.warning("DICOMweb request refused: %s bearer token (%s %s from %s)", why, scope.get("method"), path, peer)
        await run_in_threadpool(self.audit.record, Event.WEB_UNAUTHORIZED, outcome="failure", peer=peer,
                                detail=f"{scope.get('method')} {path}: {why} bearer token")
        rsp = DicomJSONResponse({"error": "a valid bearer token is required"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="scp_node"'})
        await rsp(scope, receive, send)
