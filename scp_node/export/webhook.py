"""JSON results by HTTPS POST (``[[webhooks]]``): each SR's findings sidecar to a system that
prefers JSON to DICOM or HL7.

Used by the export queue like the other senders: a 2xx answer is delivered, anything else raises
:class:`ExportError` and the queue retries with backoff and keeps a dead letter.  The body is the
sidecar as written beside the SR (``scp_node.findings/2``: UIDs, model identity, findings; no
patient name, ID, birth date or accession number).  The bearer token is read from
``token_file`` at each send (so it can be rotated without a restart) and goes only into the
Authorization header.  No redirect is followed and no proxy from the environment is used: the
configured URL is the only host reached.  ``Idempotency-Key`` is the same on every try of one
SR to one webhook, so a receiver can drop a repeat.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import requests

from ..config import WebhookDestination
from .c_store import ExportError


def send_webhook(dest: WebhookDestination, path: Path, *, timeout: float | None = None) -> int:
    """POST the JSON sidecar of the SR at ``path`` to ``dest.url``; return the HTTP status."""
    sidecar = path.with_suffix(".json")
    try:
        body = sidecar.read_bytes()
    except OSError as exc:
        raise ExportError(f"no findings JSON beside the SR ({sidecar.name}): {exc.strerror or exc}") from None
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "scp-node",
               "Idempotency-Key": hashlib.sha256(f"{path.stem}|{dest.name}".encode()).hexdigest()[:32]}
    if dest.token_file:
        try:
            token = Path(dest.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ExportError(f"cannot read token_file of {dest.name}: {exc.strerror or exc}") from None
        headers["Authorization"] = f"Bearer {token}"
    limit = timeout if timeout is not None else dest.timeout_seconds
    session = requests.Session()
    session.trust_env = False  # no proxy, no .netrc: only the configured host
    try:
        rsp = session.post(dest.url, data=body, headers=headers, timeout=(min(limit, 15.0), limit),
                           allow_redirects=False, verify=dest.tls_ca or True)
    except requests.exceptions.SSLError:
        raise ExportError(f"TLS to {dest.name} ({dest.host}:{dest.port}) failed (certificate not trusted?)") from None
    except requests.RequestException as exc:
        raise ExportError(f"cannot reach {dest.name} ({dest.host}:{dest.port}): {type(exc).__name__}") from None
    finally:
        session.close()
    if 200 <= rsp.status_code < 300:
        return rsp.status_code
    raise ExportError(f"{dest.name} answered HTTP {rsp.status_code}")
