"""The one module that builds on uvicorn's internals: its h11 protocol with a request-head timeout
and a hard connection limit (see :mod:`scp_node.web.server` for why).

uvicorn has no timeout for a request head: a client that never finishes its headers holds a
connection for ever, and its keep-alive timer only starts after a first response.  The only place
to hook that in is the protocol class, which is uvicorn's own, not a public API.  Rules kept here
(the project's rule for borrowed internals): uvicorn is pinned exactly in ``setup.cfg``;
``tests/web/test_uvicorn_compat.py`` fails loudly on another version (each name below must exist
and each overridden method's upstream source must hash as it did); ``[web] connection_guard =
false`` runs uvicorn's own protocol instead, and the web tests run both ways.

Private names and internal attributes used (uvicorn.protocols.http.h11_impl.H11Protocol):

- ``H11Protocol`` itself (subclassed; ``connection_made``, ``data_received``,
  ``connection_lost`` overridden, each calling uvicorn's first);
- ``self.connections`` (the server state's set of open protocols: counted for the limit);
- ``self.conn`` (the h11.Connection: ``their_state`` says whether a request head is owed);
- ``self.cycle`` / ``cycle.response_complete`` (a request in progress is never cut);
- ``self.transport``, ``self.loop``, ``self.client`` (set by uvicorn in ``connection_made``);
- ``self._unset_keepalive_if_required()`` (cancels uvicorn's keep-alive timer on close).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: uvicorn version this module was written against (and setup.cfg pins).
UVICORN_VERSION = "0.55.0"
#: Attributes an instance of H11Protocol must have once connection_made ran.
INTERNAL_ATTRIBUTES = ("connections", "conn", "cycle", "transport", "loop", "client")
#: Upstream methods overridden or called, with the SHA-256 of their source when this was written.
UPSTREAM_SOURCES = {
    "connection_made": "6efb565ff3d36b916c29bd42330a2b99b601b48932389e396e5ac53dbef6b91c",
    "data_received": "e03b145518ca44aafc84f6f11655e54570ce724fa24854ae1287771166316a16",
    "connection_lost": "dbb688fa2b3860005b4f7c53af5c33be1a7ac139184665008984d8935d261e91",
    "_unset_keepalive_if_required": "00a6a4e47214e68edef469a2a8f21ade722e9c6dfb2eb6c25855fbd9941cec32",
}

_SERVICE_UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                        b"content-length: 19\r\nconnection: close\r\n\r\nService Unavailable")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and a hard connection limit.

    The header timer runs while the peer owes us a request head (h11's ``their_state`` is IDLE):
    armed when the connection opens and when bytes of a new request arrive on a kept-alive
    connection, cancelled as soon as a complete head has been parsed.  Between requests uvicorn's
    own keep-alive timer applies.  :attr:`guard` is set on a subclass per server.
    """

    guard: Any  #: the server's ConnectionGuard (limits and the audit of closed connections)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.guard.max_connections:
            transport.write(_SERVICE_UNAVAILABLE)
            transport.close()
            self.guard.closed_one("max_connections", self._peer())
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._cancel_header_timer()
        elif self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # part of a request head: it must be complete in time
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is None:
            self._header_timer = self.loop.call_later(self.guard.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # (cannot be: a request is running only after its head was complete)
        self.transport.close()
        self._unset_keepalive_if_required()
        self.guard.closed_one("header_timeout", self._peer())

    def _peer(self) -> str:
        return self.client[0] if self.client else ""


def guarded_protocol(guard: Any) -> type[GuardedH11Protocol]:
    """The protocol class for one server, bound to its :class:`~scp_node.web.server.ConnectionGuard`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
