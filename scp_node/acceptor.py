"""Acceptor associations: a thread that sleeps until its DUL has something for it.

pynetdicom's association thread sleeps 1 ms and checks for a DIMSE message, again and again:
with the DUL's own polling, about 4 % of a core per idle association, and under load a thousand
requests a second for the GIL (see :mod:`scp_node.upper_layer`).  :class:`WakingAssociation`
waits on an event instead, which the DUL (:class:`scp_node.upper_layer.WakingUpperLayer`) sets
when a state machine action leaves something for it.  Its loop repeats pynetdicom 3.0's
``Association._run_reactor`` check for check, with the 1 ms sleep replaced by the event.
:class:`WakingRequestHandler` makes such an association for every accepted connection.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler

from .dimse import ReceivingDIMSE
from .upper_layer import POLL_INTERVAL, WakingUpperLayer

log = logging.getLogger(__name__)


class WakingAssociation(Association):
    """An acceptor association whose thread sleeps until its DUL has something for it."""

    def __init__(self, ae: Any, mode: str, spool_dir: Path | None = None) -> None:
        self._wakeup = threading.Event()
        super().__init__(ae, mode)
        # Association.__init__ made a polling DUL and gave it the AE's timeouts: take those over.
        polling, self.dul = self.dul, WakingUpperLayer(self)
        self.dul._idle_timer, self.dul.artim_timer = polling._idle_timer, polling.artim_timer
        self.dimse = ReceivingDIMSE(self, spool_dir)

    def wake(self) -> None:
        self._wakeup.set()

    def kill(self) -> None:
        self._wakeup.set()
        if threading.current_thread() is self.dul:
            # Called while the DUL thread serves a C-STORE (an abort from a handler): pynetdicom's
            # kill() would wait for the DUL thread to reach Sta1 -- on that very thread. Mark the
            # association dead; the association thread stops the DUL when its loop sees it.
            self._reactor_checkpoint.set()
            self._kill = True
            self.is_established = False
            self._is_paused = True
            return
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop, waiting on :attr:`_wakeup` instead of sleeping 1 ms."""
        try:
            self._reactor_loop()
        finally:
            if self.dul.is_alive():  # killed from the DUL thread (see kill): stop it from here
                super().kill()

    def _reactor_loop(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._wakeup.wait(POLL_INTERVAL)
            self._wakeup.clear()  # anything that happens from here on wakes the next wait

            # Let send_*() calls from handlers pause the reactor (pynetdicom's checkpoint).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._wakeup.set()  # another message may have been queued before the clear
                continue

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


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


class WakingRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating a :class:`WakingAssociation` for each connection.

    :meth:`_create_association` is pynetdicom 3.0's, with the association class changed.
    """

    def _create_association(self) -> Association:
        assoc = WakingAssociation(self.ae, MODE_ACCEPTOR, getattr(self.server, "spool_dir", None))
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        use_kernel_timeouts(self.request, self.ae.network_timeout)
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))

        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        contexts = self.server.contexts  # the node's are read-only during an association (see listener)
        acceptor.supported_contexts = contexts if getattr(contexts, "shared_by_associations", False) \
            else deepcopy(contexts)
        assoc.requestor.address_info = self.remote

        handlers = self.server._handlers
        for event in handlers:
            if event.is_intervention and handlers[event]:
                assoc.bind(event, *handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers[event]:
                    assoc.bind(event, handler, args)
        return assoc
