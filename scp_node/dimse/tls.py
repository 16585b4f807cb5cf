"""DICOM TLS (PS3.15 Annex B.1, the "basic TLS secure transport connection profile").

The SCP side: with ``[node] tls_cert``/``tls_key`` every association is TLS; with ``tls_ca`` a
caller must also present a certificate signed by that CA (mutual TLS), so anonymous TLS and
self-signed client certificates fail in the handshake, before any DICOM byte is read.  The SCU
side (export) verifies the destination against its CA.  TLS 1.2 is the floor, as the profile asks.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from ..config import Destination, NodeConfig


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be loaded; the message names the file."""


def server_context(node: NodeConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context, or None when ``[node]`` has no certificate (plain DICOM)."""
    if not node.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(node.tls_cert, node.tls_key)
        if node.tls_ca:
            ctx.load_verify_locations(cafile=node.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx.verify_mode = ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"[node] TLS files ({node.tls_cert}, {node.tls_key}, {node.tls_ca or 'no CA'}) "
                             f"cannot be loaded: {exc}") from None
    return ctx


def client_context(dest: Destination) -> ssl.SSLContext | None:
    """The export SCU's TLS context for ``dest``, or None when it is a plain DICOM destination.

    The destination is verified against ``tls_ca`` (or the system store); its host name is not
    checked because PACS certificates are routinely issued to an AE, not to the DNS name we dial.
    """
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if dest.tls_cert:
        ctx.load_cert_chain(dest.tls_cert, dest.tls_key)
    return ctx


def defer_handshakes(server: Any, ctx: ssl.SSLContext) -> None:
    """Move the TLS handshake from pynetdicom's accept loop into each association's own thread.

    pynetdicom wraps an accepted socket with the handshake done at once, in the one thread that
    accepts every connection: a caller that connects and never sends a ClientHello would stall
    every other caller.  With ``do_handshake_on_connect=False`` the handshake happens on the
    association thread's first read, under the same network timeout as any other read; a
    failure there is audited by the connection guard (:mod:`scp_node.handlers.association`).
    """
    accept = server.get_request  # the server's own accept (scp_node.dimse.listener balances receivers there)

    def get_request() -> tuple[socket.socket, Any]:
        client, address = accept()
        return ctx.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    server.get_request = get_request
