"""What goes over the socket: the node's listening socket, the kernel's network timeout on an
accepted one, and the framing of PDUs (PS3.8 9.3) as the fast path reads and writes them."""

from __future__ import annotations

import socket
import struct
from typing import Any

#: PDU header: type, reserved, length (PS3.8 9.3.1).
PDU_HEADER = struct.Struct(">BBL")
PDU_TYPES = frozenset({0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07})
P_DATA_TF = 0x04
#: A P-DATA-TF PDU with one PDV: type, reserved, PDU length; item length, context ID, control header.
P_DATA_TF_HEADER = struct.Struct(">BBLLBB")
_ITEM_LENGTH = struct.Struct(">L")


class ListenError(RuntimeError):
    """The port cannot be opened (message says why)."""


def open_listening_socket(host: str, port: int) -> socket.socket:
    """The node's listening socket, opened once by the node process and shared by every receiver."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=64, reuse_port=False)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)  # receivers race to accept: the losers get EAGAIN, not a blocked thread
    return sock


def use_kernel_timeouts(sock: Any, timeout: float | None) -> None:
    """Make a plain TCP socket blocking, with the network timeout kept by the kernel
    (``SO_RCVTIMEO``/``SO_SNDTIMEO``) instead of by Python.

    With a Python timeout every ``recv`` is a ``poll`` and then the ``recv``: two system calls,
    and two hand-overs of the GIL, for each of the two reads of every PDU.  The DUL only reads
    after ``select`` said there is data, so the read itself rarely waits; when it does (a peer
    stalling inside a PDU), the kernel's timeout ends it as Python's did, with an ``OSError``
    the DUL takes for a closed connection.  TLS sockets keep Python's timeout.
    """
    if type(sock) is not socket.socket:  # (an SSLSocket, or anything else: left as it is)
        return
    sock.settimeout(None)
    if timeout is not None and timeout > 0:
        seconds = int(timeout)
        value = struct.pack("@ll", seconds, int((timeout - seconds) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def pdv_items(body: bytearray | bytes) -> list[list[Any]] | None:
    """The presentation data values of a P-DATA-TF PDU body as ``[context ID, data]`` pairs, the
    data (message control header first) as views into ``body``, not copies.

    ``None`` when an item is not well formed (shorter than its context ID and control header,
    or running past the PDU): pynetdicom's decoder then handles the PDU and its error path.
    """
    items: list[list[Any]] = []
    view = memoryview(body)
    pos, end = 0, len(body)
    while pos < end:
        if pos + 4 > end:
            return None
        length = _ITEM_LENGTH.unpack_from(body, pos)[0]
        start, pos = pos + 4, pos + 4 + length
        if length < 2 or pos > end:
            return None
        items.append([body[start], view[start + 1:pos]])
    return items or None
