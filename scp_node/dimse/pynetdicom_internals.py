"""The one module of scp_node that touches pynetdicom's internals: the receive path's fast path.

pynetdicom (pinned exactly in ``setup.cfg``) runs every association on two threads that poll, and
hands each received PDU, DIMSE message and response through queues and a state machine turn.
The fast path below keeps pynetdicom's state machine, ACSE, service classes and event handlers,
and replaces the parts that cost the CPU (measured with py-spy and ``benchmarks/ingest_bench.py``;
the README's Performance section has the figures):

* :class:`WakingUpperLayer` -- the DUL thread waits in ``select`` on the socket and a wake-up pipe
  instead of sleeping 1 ms per turn; a P-DATA-TF PDU on an established association (Sta6 + Evt10,
  DT-2 "pass the data to DIMSE", no change of state) goes straight to DIMSE as it is read; an
  A-ASSOCIATE-RQ seen before is not decoded again.
* :class:`_WakingStateMachine` -- wakes the association thread when an action leaves it work;
  AE-7 sends the A-ASSOCIATE-AC bytes remembered for an accept seen before.
* :class:`WakingAssociation` -- the association thread waits on an event, not a 1 ms sleep.
* :class:`ReceivingDIMSE` / :class:`StoreRequestMessage` -- data sets into a
  :class:`~scp_node.dimse.buffer.DataSetBuffer`; a plain C-STORE-RQ command set read without
  pydicom; the request served, and its success response sent, on the DUL thread.
* :func:`install_negotiation_memo` -- ACSE negotiates through :mod:`scp_node.dimse.negotiation`.
* :class:`WakingRequestHandler` -- makes a :class:`WakingAssociation` for each connection.

With ``[node] fast_path = false`` none of these classes is used: the listener runs pynetdicom's
own ``RequestHandler`` and everything pynetdicom does is its own (only :func:`configure_library`,
:func:`register_server` and, for a spool file pynetdicom would leave behind,
:func:`discard_library_partial` are used there).  Handlers that watch PDUs, data or
state transitions (``EVT_PDU_RECV``, ``EVT_DATA_RECV``, ``EVT_PDU_SENT``, ``EVT_DATA_SENT``,
``EVT_FSM_TRANSITION``, ``EVT_DIMSE_RECV``, ``EVT_DIMSE_SENT``) switch the corresponding shortcut
off for their association, so they see what pynetdicom would show them.

Every private pynetdicom name this module uses, and why (:data:`PRIVATE_NAMES` is the same list
for ``tests/test_compat.py``, which checks each exists):

``pynetdicom._config``: ``STORE_RECV_CHUNKED_DATASET`` (fast path: our buffer receives the data
    set; library path: pynetdicom's own spool file keeps memory bounded) and ``LOG_HANDLER_LEVEL``
    (pynetdicom's standard logging handlers off unless ``serve -v``).  Documented settings, in a
    private module.
``pynetdicom._globals.MODE_ACCEPTOR``: the mode an acceptor association is created with.
``AE._servers``: a started server is registered as ``AE.start_server`` does, so that
    ``AE.active_associations`` and ``AE.shutdown`` see it (start_server itself does not take our
    server class when it does not block).
``RequestHandler._create_association`` (overridden) and ``AssociationServer._handlers``
    (read): the handler creates our association class and binds the server's handlers as
    pynetdicom's does.
``Association._server``: set on each association, as pynetdicom's request handler does.
``Association._run_reactor`` (overridden), ``_kill``, ``_is_paused``, ``_reactor_checkpoint``,
    ``_dul_ready``, ``_serve_request``, ``_accepted_cx``, ``_sent_release``: the association
    loop is pynetdicom's check for check, waiting on an event instead of a 1 ms sleep; the DUL
    thread serves a C-STORE itself with pynetdicom's ``_serve_request``.
``DULServiceProvider._is_transport_event``, ``_read_pdu_data``, ``_decode_pdu``,
    ``_process_recv_primitive`` (overridden), ``_kill_thread``, ``_idle_timer``, ``_recv_pdu``:
    the DUL loop (``run_reactor``'s, without its sleep) and its PDU read.
``P_DATA._presentation_data_value_list`` and ``C_STORE._context_id``: written directly, the
    first with views instead of byte copies (its setter insists on bytes).
``DIMSEMessage.encoded_command_set`` use and ``decode_msg`` (overridden, falling back to
    pynetdicom's), ``__class__`` set on a new ``DIMSEMessage`` (pynetdicom itself turns a plain
    message into its decoded class the same way).
``acse.negotiate_as_acceptor``: the module global ACSE calls, replaced by the remembered
    negotiation (``presentation.negotiate_as_acceptor`` stays pynetdicom's and computes it).
``DIMSEMessage._data_set_file``, ``_data_set_path``: on the library path, the spool file of a
    data set cut off by an abort is removed (:func:`discard_library_partial`; pynetdicom leaves it).
``PresentationContext._transfer_syntax`` and ``A_ASSOCIATE._presentation_context_definition_list``,
    ``_presentation_context_definition_results_list``, ``_user_information``: copies of remembered
    contexts and request primitives are made without re-validating every UID.

The upstream functions copied or overridden here are listed with the SHA-256 of their source
(``inspect.getsource``) in :data:`UPSTREAM_SOURCES`; ``tests/test_compat.py`` fails, naming
each, when pynetdicom's changed: read the new source, port the change, update the hash.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import queue
import select
import ssl
import struct
import threading
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from pynetdicom import _config, acse, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler

from . import negotiation
from .buffer import DataSetBuffer
from .commands import store_request, store_success_command
from .transport import P_DATA_TF_HEADER, PDU_HEADER, PDU_TYPES, P_DATA_TF, pdv_items, use_kernel_timeouts
from ..store.part10 import part10_header

log = logging.getLogger(__name__)

#: Longest wait without an event, in seconds: the granularity of the ARTIM and idle timers.
POLL_INTERVAL = 0.05

#: (where, name): every private pynetdicom name used here; ``where`` is a module, a class, or
#: ``"instance:<class>"`` for an attribute set in ``__init__`` (checked on real objects by
#: tests/test_compat.py).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET"),
    ("pynetdicom._config", "LOG_HANDLER_LEVEL"),
    ("pynetdicom._globals", "MODE_ACCEPTOR"),
    ("pynetdicom.acse", "negotiate_as_acceptor"),
    ("instance:pynetdicom.ae.ApplicationEntity", "_servers"),
    ("pynetdicom.transport.RequestHandler", "_create_association"),
    ("instance:pynetdicom.transport.AssociationServer", "_handlers"),
    ("pynetdicom.association.Association", "_run_reactor"),
    ("pynetdicom.association.Association", "_serve_request"),
    ("instance:pynetdicom.association.Association", "_kill"),
    ("instance:pynetdicom.association.Association", "_is_paused"),
    ("instance:pynetdicom.association.Association", "_reactor_checkpoint"),
    ("instance:pynetdicom.association.Association", "_dul_ready"),
    ("instance:pynetdicom.association.Association", "_accepted_cx"),
    ("instance:pynetdicom.association.Association", "_sent_release"),
    ("instance:pynetdicom.association.Association", "_server"),
    ("pynetdicom.dul.DULServiceProvider", "_is_transport_event"),
    ("pynetdicom.dul.DULServiceProvider", "_read_pdu_data"),
    ("pynetdicom.dul.DULServiceProvider", "_decode_pdu"),
    ("pynetdicom.dul.DULServiceProvider", "_process_recv_primitive"),
    ("instance:pynetdicom.dul.DULServiceProvider", "_kill_thread"),
    ("instance:pynetdicom.dul.DULServiceProvider", "_idle_timer"),
    ("instance:pynetdicom.dul.DULServiceProvider", "_recv_pdu"),
    ("instance:pynetdicom.pdu_primitives.P_DATA", "_presentation_data_value_list"),
    ("instance:pynetdicom.dimse_primitives.C_STORE", "_context_id"),
    ("instance:pynetdicom.presentation.PresentationContext", "_transfer_syntax"),
    ("instance:pynetdicom.dimse_messages.DIMSEMessage", "_data_set_file"),
    ("instance:pynetdicom.dimse_messages.DIMSEMessage", "_data_set_path"),
    ("instance:pynetdicom.pdu_primitives.A_ASSOCIATE", "_presentation_context_definition_list"),
    ("instance:pynetdicom.pdu_primitives.A_ASSOCIATE", "_presentation_context_definition_results_list"),
    ("instance:pynetdicom.pdu_primitives.A_ASSOCIATE", "_user_information"),
)

#: Attributes with public names that are still pynetdicom's internal machinery, read or written
#: here (checked like :data:`PRIVATE_NAMES`).
INTERNAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("instance:pynetdicom.dul.DULServiceProvider", "event_queue"),
    ("instance:pynetdicom.dul.DULServiceProvider", "to_provider_queue"),
    ("instance:pynetdicom.dul.DULServiceProvider", "to_user_queue"),
    ("instance:pynetdicom.dul.DULServiceProvider", "artim_timer"),
    ("instance:pynetdicom.dul.DULServiceProvider", "state_machine"),
    ("instance:pynetdicom.dul.DULServiceProvider", "socket"),
    ("instance:pynetdicom.dimse.DIMSEServiceProvider", "msg_queue"),
    ("instance:pynetdicom.dimse.DIMSEServiceProvider", "message"),
    ("instance:pynetdicom.dimse_messages.DIMSEMessage", "encoded_command_set"),
    ("instance:pynetdicom.dimse_messages.DIMSEMessage", "data_set"),
    ("pynetdicom.fsm.StateMachine", "transition"),
    ("pynetdicom.transport.AssociationSocket", "recv"),
)

#: Upstream functions this package copied (c), overrides (o), or whose behaviour a shortcut
#: repeats or relies on (r), with the SHA-256 of their ``inspect.getsource`` text as it was in
#: pynetdicom 3.0.4 when that was done.  A changed hash means: read the new source, port the change
#: (or check that it needs none), then update the hash.
UPSTREAM_SOURCES: dict[str, str] = {
    # WakingUpperLayer
    "pynetdicom.dul.DULServiceProvider.__init__":  # (r) the attributes taken over
        "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    "pynetdicom.dul.DULServiceProvider.run_reactor":  # (c) _reactor_loop, without the sleep
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data":  # (c) P-DATA straight to DIMSE
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    "pynetdicom.dul.DULServiceProvider._decode_pdu":  # (o) remembered per request bytes
        "fc71dd1bf853e1ce79d29b11731a26a4f6ee9eb697026ad611f8fc91f8aa69c9",
    "pynetdicom.dul.DULServiceProvider._is_transport_event":  # (o) no second select
        "8725ed03bb8fbdefef249d5d9888c120e6277d7b6aa2c4f537e23027186e1253",
    "pynetdicom.dul.DULServiceProvider._process_recv_primitive":  # (o) waits first
        "4c0ebbb3e646e35e8e5bbc27ee2f1e6b2c82bbf619232f47639a6cbae092ed39",
    "pynetdicom.dul.DULServiceProvider.stop_dul":  # (c) with a wake-up
        "28a7e0be126e7b306369cc1b131daec8e907d21d0f5692930133b6599b8c6e5f",
    "pynetdicom.dul.DULServiceProvider.send_pdu":  # (o) with a wake-up
        "7cbce5da8594124e9e70c790a68df640d21df11af4220783e752bc607de8dde6",
    "pynetdicom.dul.DULServiceProvider.kill_dul":  # (o) with a wake-up
        "5ceccf8dd01c2072c377d18bb1be284941a345bd40f03bd1e03a864ab0817842",
    # _WakingStateMachine
    "pynetdicom.fsm.StateMachine.do_action":  # (o) wakes the association thread
        "9a883f44c7f31641b7847b97b51a72abdd31a3c8a9d31031cae7f7d929383dd9",
    "pynetdicom.fsm.AE_6":  # (r) calls pdu.to_primitive(), which the memo replaces per PDU
        "385d595ed49432afe80c0284b6355b03f83db8ed3e37caae6c30820bf7280b98",
    "pynetdicom.fsm.AE_7":  # (c) _send_associate_ac, with remembered bytes
        "c62284735836c78a25d855f8beecd976441564d1dbf784b17e7adb1cdf2496a7",
    "pynetdicom.fsm.DT_1":  # (r) a C-STORE success response sent from the DUL thread
        "82e5c5d4114534fa9ac86124c7c7ef11ff2b98bc73069372cbe413af9df19081",
    "pynetdicom.fsm.DT_2":  # (r) P-DATA handed to DIMSE without the state machine
        "9ec543394e0b49eb8be2448fc3f9950361b0047db7cf3742844f377bd225ba73",
    "pynetdicom.pdu.A_ASSOCIATE_RQ.to_primitive":  # (r) its result copied
        "92cb1a8bedf659e5ed93aafac546740e080a9e94cae90b22e150f407e4c05019",
    "pynetdicom.pdu.A_ASSOCIATE_AC.from_primitive":  # (r) what the accept memo's key covers
        "1dd28ce4925d42a6be18d926c92f9c5ea9bc7cee50696b729c009a32658573bb",
    # WakingAssociation, WakingRequestHandler
    "pynetdicom.association.Association.__init__":  # (r) the DUL and DIMSE replaced after it
        "eb07516b8009ad8fa338201dea39578380fbf9f2c59fa5e368e20250eb97c4ea",
    "pynetdicom.association.Association._run_reactor":  # (c) _reactor_loop, waiting on an event
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    "pynetdicom.association.Association.kill":  # (o) callable from the DUL thread
        "8f9713666a7f4cffd840899f023090e9786668945a7c844f99d7a834077c3972",
    "pynetdicom.association.Association._serve_request":  # (r) called on the DUL thread
        "2f24c1759cdf6c8c433094f2a8dd8144f76f5547f03daed7b94e0f78bc12f877",
    "pynetdicom.transport.RequestHandler._create_association":  # (c) our association class
        "05c8d12b79863cdbdb901ce37187b7030a0434c5cd89d219ed0bedbda679a61e",
    # ReceivingDIMSE, StoreRequestMessage
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive":  # (o) our buffer, served here
        "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
    "pynetdicom.dimse.DIMSEServiceProvider.send_msg":  # (o) success response encoded directly
        "a839cf2fb46976d9da29cf06fea41c04416b38d14fab612af12e5d869bd5b3f0",
    "pynetdicom.dimse_messages.DIMSEMessage.__init__":  # (r) new() sets the class after it
        "b9c44307ebf25f196c1a13ef9273539444cb5f20207322544ab5feb4f6afda84",
    "pynetdicom.dimse_messages.DIMSEMessage.decode_msg":  # (o) falls back to it
        "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    "pynetdicom.dimse_messages.DIMSEMessage.message_to_primitive":  # (o) our request primitive
        "f8f43d34e43450efa31bd308677b85b370f8ca7600c0e067e854f8095ce665ac",
    # negotiation memo
    "pynetdicom.presentation.negotiate_as_acceptor":  # (r) what the memo's key covers
        "d5413f08f0ac7b32b2b95f629d88242be5785d4a37888a14c265e0c27452da05",
    "pynetdicom.presentation.PresentationContext.__init__":  # (r) copy_context skips it
        "37a8842ac07cd8f364dba03f5f7a59c23a0068341873edd81d367ad0c75596d9",
    "pynetdicom.pdu_primitives.A_ASSOCIATE.__init__":  # (r) copy_request_primitive skips it
        "08a652018afa2f09aac418c82226d2e606b736e740a12a800ed8842f685b3e97",
    # the shared-socket server (scp_node.dimse.listener) and TLS (scp_node.dimse.tls)
    "pynetdicom.transport.AssociationServer.__init__":  # (r) its server_bind is ours
        "edacb98bdfb7b9744194698d47fa51d4e2d5c9ed02ef5fb5181f381b31118423",
    "pynetdicom.transport.AssociationServer.get_request":  # (o) balance receivers; TLS deferred
        "925a4f3a3042f6e4b944505d06dc19c41e10ff7dec5385c794d62d31fd000300",
    "pynetdicom.transport.AssociationServer.server_bind":  # (o) the listening socket shared
        "cf69278a05a5c777b7e9e9af0769e3102618027b2ec8035a30af8cc370ebdae6",
    "pynetdicom.transport.AssociationServer.server_close":  # (o) only our descriptor
        "3fa1b358badbe6826671da5e9d11cd86944be35327c47caeeff571f74bc3cca9",
    "pynetdicom.transport.AssociationServer.service_actions":  # (o) full collection once a minute
        "0a0853a3615ac7c5260a57dcdc8b0e9908d655919b7d64737c89534869758873",
}


# -- library settings and server registration (both modes) ------------------------------------

def configure_library(fast_path: bool) -> None:
    """pynetdicom's process-wide settings for the receive path.

    Fast path: received data sets go to :class:`~scp_node.dimse.buffer.DataSetBuffer` (memory,
    or a spool file past 16 MiB), never to pynetdicom's per-instance temporary files.  Library
    path: pynetdicom's own spool file per data set, so that memory stays bounded there too.
    pynetdicom's standard logging handlers format every PDU and DIMSE message whatever the log
    level (a few percent of a receiver's CPU); the audit records what matters.  With ``serve -v``
    (pynetdicom at DEBUG) they stay on.
    """
    _config.STORE_RECV_CHUNKED_DATASET = not fast_path
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"


def library_settings() -> tuple[Any, ...]:
    """What :func:`configure_library` and :func:`install_negotiation_memo` change, to put back."""
    return _config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL, acse.negotiate_as_acceptor


def restore_library_settings(saved: tuple[Any, ...]) -> None:
    _config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL, acse.negotiate_as_acceptor = saved


def discard_library_partial(event: Any) -> None:
    """EVT_CONN_CLOSE on the library path: remove the spool file pynetdicom opened for a data set
    the connection ended in the middle of.  pynetdicom 3.0.4 removes its file after the C-STORE
    handler ran, but leaves the file of a data set cut off by an abort or a lost connection in
    the temporary folder, one per aborted transfer (``tests/dimse/test_reactor_edges.py``)."""
    message = getattr(event.assoc.dimse, "message", None)
    spool = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if spool is None or not isinstance(path, Path):
        return
    try:
        spool.close()
        path.unlink()
        log.info("removed the spool file of a data set the association did not finish")
    except OSError:
        pass


def library_path_handlers() -> list[tuple[Any, Any]]:
    """Handlers the node binds on pynetdicom's own path ([node] fast_path = false)."""
    return [(evt.EVT_CONN_CLOSE, discard_library_partial)]


def register_server(ae: Any, server: Any) -> None:
    """Register a server started on our own thread, as ``AE.start_server`` does."""
    ae._servers.append(server)


# -- negotiation memo hooks ---------------------------------------------------------------------

def copy_context(cx: PresentationContext) -> PresentationContext:
    """A new presentation context with ``cx``'s values (its transfer syntax list copied too),
    without the validating setters (they check every UID again)."""
    new = object.__new__(PresentationContext)
    values = cx.__dict__.copy()
    values["_transfer_syntax"] = values["_transfer_syntax"][:]
    new.__dict__ = values
    return new


def copy_request_primitive(template: A_ASSOCIATE) -> A_ASSOCIATE:
    """A new A-ASSOCIATE (request) primitive equal to ``template``: its presentation contexts and
    user information items are copies, so the association may change them freely."""
    primitive = A_ASSOCIATE.__new__(A_ASSOCIATE)
    primitive.__dict__.update(template.__dict__)
    primitive._presentation_context_definition_list = [
        copy_context(cx) for cx in template._presentation_context_definition_list]
    primitive._presentation_context_definition_results_list = []
    primitive._user_information = [copy.copy(item) for item in template._user_information]
    return primitive


def remember_request_primitive(pdu: Any) -> None:
    """Make the decoded A-ASSOCIATE-RQ ``pdu`` (kept for identical requests by the upper layer)
    hand out copies of one primitive instead of building a new one from its items each time.

    pynetdicom's AE-6 calls ``pdu.to_primitive()``; the PDU object is only read, so its
    primitive is worked out once here and every later call returns a copy of it.
    """
    template = pdu.to_primitive()
    pdu.to_primitive = functools.partial(copy_request_primitive, template)


def negotiate_as_acceptor(rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext],
                           roles: dict[Any, Any] | None = None) -> tuple[list[PresentationContext], list[Any]]:
    """pynetdicom's negotiation, remembered (:func:`scp_node.dimse.negotiation.negotiated`):
    the result contexts and role selection items are copies of the remembered ones."""
    contexts, role_items = negotiation.negotiated(rq_contexts, ac_contexts, roles)
    return [copy_context(cx) for cx in contexts], [copy.copy(item) for item in role_items]


_library_negotiate = acse.negotiate_as_acceptor


def install_negotiation_memo(on: bool = True) -> None:
    """Make pynetdicom's ACSE negotiate through the memo (``on``) or through its own function."""
    acse.negotiate_as_acceptor = negotiate_as_acceptor if on else _library_negotiate


# -- the upper layer (DUL) ------------------------------------------------------------------------

#: Handlers of these events need pynetdicom's decoded PDU and its state machine turn.
_WATCHING_RECEIVED = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)
_WATCHING_EVENTS = (*_WATCHING_RECEIVED, evt.EVT_FSM_TRANSITION)
_WATCHING_AC_SENT = (evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)  # (EVT_DATA_SENT: the socket tells)
_WATCHING_SENT = (evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_FSM_TRANSITION)

#: Decoded A-ASSOCIATE-RQ PDUs by their bytes (see WakingUpperLayer._decode_pdu), oldest first.
_ASSOCIATE_RQ_CACHE: dict[bytes, Any] = {}
_ASSOCIATE_RQ_CACHED = 16
_ASSOCIATE_RQ_LOCK = threading.Lock()


def forget() -> None:
    """Drop every remembered request and negotiation (tests)."""
    with _ASSOCIATE_RQ_LOCK:
        _ASSOCIATE_RQ_CACHE.clear()
    negotiation.forget()


class _WakingStateMachine(StateMachine):
    """pynetdicom's state machine; wakes the association thread when an action leaves it work."""

    def do_action(self, event: str) -> None:
        state = self.current_state
        try:
            if event == "Evt7" and state == "Sta3" and not any(self.dul.assoc.get_handlers(e)
                                                                for e in _WATCHING_AC_SENT):
                self._send_associate_ac()
            else:
                super().do_action(event)
        finally:
            self.dul.wake_association(state != self.current_state)  # type: ignore[attr-defined]

    def _send_associate_ac(self) -> None:
        """AE-7 (send the A-ASSOCIATE-AC, go to Sta6) with the PDU bytes remembered for an accept
        seen before (:func:`scp_node.dimse.negotiation.accept_pdu_bytes`).  Only when no handler
        watches sent PDUs or transitions, which pynetdicom's AE-7 would have told."""
        dul = self.dul
        try:
            primitive = dul.to_provider_queue.get(False)
            data = negotiation.accept_pdu_bytes(primitive)
            if dul.socket is not None:
                dul.socket.send(data)
            else:
                log.warning("Attempted to send data over closed connection")
            self.transition("Sta6")
        except Exception:
            log.exception("State machine failed sending the A-ASSOCIATE-AC in state Sta3")
            dul.kill_dul()
            raise


class WakingUpperLayer(DULServiceProvider):
    """The DUL thread of an acceptor association, waiting in ``select`` instead of sleeping.

    pynetdicom's reactor loop is kept check for check (:meth:`_reactor_loop`) but without its
    sleep between turns; the wait happens in :meth:`_process_recv_primitive`, which the loop
    calls first on every turn: when nothing is queued to send, no event is pending and the
    socket has no data, it blocks until one of those changes (or the poll interval passes).
    Both threads still wake at least every :data:`POLL_INTERVAL` seconds so that the ARTIM,
    idle (network) and DIMSE timers fire as before.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.state_machine = _WakingStateMachine(self)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # no write to a closed (and maybe reused) descriptor
        self._readable = False  # the last wait saw the peer's socket readable

    def wake_association(self, state_changed: bool = False) -> None:
        """Wake the association thread when there is something for it: a DIMSE message (a
        C-STORE was already served on this thread), a primitive (release, abort), a new state.
        Waking it for every PDU would cost a context switch each."""
        assoc = self.assoc
        if state_changed or self.to_user_queue.qsize() or assoc.dimse.msg_queue.qsize():
            wake = getattr(assoc, "wake", None)
            if wake is not None:
                wake()

    def wake(self) -> None:
        """Make a waiting DUL thread look at its queues now."""
        with self._wake_lock:
            if self._wake_w < 0:  # the thread has ended
                return
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):  # pipe full: already woken
                pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's: stop the reactor if it is in Sta1, waiting for the thread to end."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def run_reactor(self) -> None:
        try:
            self._reactor_loop()
        finally:
            discard = getattr(self.assoc.dimse, "discard_partial", None)
            if discard is not None:
                discard()  # a data set cut off with the connection: nothing more will arrive
            wake = getattr(self.assoc, "wake", None)
            if wake is not None:
                wake()  # the association thread sees at once that the DUL is gone
            with self._wake_lock:
                for fd in (self._wake_r, self._wake_w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                self._wake_r = self._wake_w = -1

    def _reactor_loop(self) -> None:
        """pynetdicom's ``DULServiceProvider.run_reactor``, check for check, without its
        ``time.sleep(_run_loop_delay)`` between turns: the wait is in :meth:`_wait`, and a
        ``sleep(0)`` is still a system call that hands the GIL to any other thread wanting it
        (seven times per received CT slice)."""
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()  # let the association thread off the leash
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # Either encode and send a primitive or receive and decode a PDU per turn.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort, bypassing the state machine
                log.error("Exception in the DUL reactor, aborting the association: %s", exc)
                log.debug("DUL reactor exception", exc_info=True)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                cast(AssociationSocket, self.socket).send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                continue
            self.state_machine.do_action(event)

    def _is_transport_event(self) -> bool:
        """pynetdicom's check, without asking ``select`` again when :meth:`_wait` just saw the
        socket readable (one system call, and one hand-over of the GIL, less per PDU)."""
        if self._readable and self.state_machine.current_state != "Sta13":
            self._readable = False
            self._read_pdu_data()
            return True
        self._readable = False
        return super()._is_transport_event()

    def _read_pdu_data(self) -> None:
        """Read one PDU: pynetdicom's ``_read_pdu_data``, step for step, but a P-DATA-TF PDU that
        DT-2 would pass to DIMSE unchanged goes to DIMSE at once (see the module docstring)."""
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        try:
            pdu_type, _, length = PDU_HEADER.unpack(header)
        except struct.error:
            self.event_queue.put("Evt17")  # the peer closed the connection
            return
        if pdu_type not in PDU_TYPES:
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.error("The received PDU is shorter than expected (%d of %d bytes received)", 6 + len(body),
                      6 + length)
            self.event_queue.put("Evt17")
            return
        if pdu_type == P_DATA_TF and self._passes_data_directly():
            items = pdv_items(body)
            if items is not None:
                primitive = P_DATA()
                # (the setter insists on bytes; the views spare copying each fragment once more)
                primitive._presentation_data_value_list = items
                self.assoc.dimse.receive_primitive(primitive)  # DT-2
                self.wake_association()
                return
        bytestream = bytearray(header)
        bytestream += body
        try:
            pdu, event = self._decode_pdu(bytestream)
            self.event_queue.put(event)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
            log.error("Unable to decode the received PDU data: %s", exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom's decode; an A-ASSOCIATE-RQ seen before (byte for byte) is not decoded again.

        A modality that opens an association per image sends the same request every time, and
        decoding its presentation contexts (a UID object and a validation for each abstract and
        transfer syntax) was a quarter of the CPU such an association costs.  The decoded PDU is
        only read afterwards (AE-6 turns it into a new primitive each time), so one object can
        serve every identical request.  Not when a handler watches received data or PDUs.
        """
        if bytestream[:1] != b"\x01" or any(self.assoc.get_handlers(e) for e in _WATCHING_RECEIVED):
            return super()._decode_pdu(bytestream)
        key = bytes(bytestream)
        with _ASSOCIATE_RQ_LOCK:
            pdu = _ASSOCIATE_RQ_CACHE.pop(key, None)
            if pdu is not None:
                _ASSOCIATE_RQ_CACHE[key] = pdu  # most recently used last
                return pdu, "Evt6"
        pdu, event = super()._decode_pdu(bytestream)
        if event == "Evt6":
            remember_request_primitive(pdu)  # later requests get copies of one primitive
        with _ASSOCIATE_RQ_LOCK:
            _ASSOCIATE_RQ_CACHE[key] = pdu
            while len(_ASSOCIATE_RQ_CACHE) > _ASSOCIATE_RQ_CACHED:
                del _ASSOCIATE_RQ_CACHE[next(iter(_ASSOCIATE_RQ_CACHE))]
        return pdu, event

    def _passes_data_directly(self) -> bool:
        """Sta6, nothing queued ahead of this PDU, and no handler watching PDUs, data or
        transitions: DT-2 is all the state machine would do."""
        if self.state_machine.current_state != "Sta6" or self.event_queue.qsize() or self._recv_pdu.qsize():
            return False
        assoc = self.assoc
        return not any(assoc.get_handlers(event) for event in _WATCHING_EVENTS)

    def _process_recv_primitive(self) -> bool:
        if not (self._kill_thread or self.to_provider_queue.qsize() or self.event_queue.qsize()):
            self._wait()
        return super()._process_recv_primitive()

    def _wait(self) -> None:
        """Block until the peer sent data, a primitive was queued, or the poll interval passed."""
        fds: list[Any] = [self._wake_r]
        raw = getattr(self.socket, "socket", None) if self.socket is not None else None
        if raw is not None and getattr(self.socket, "_is_connected", False):
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes already buffered: select would not see them
            fds.append(raw)
        try:
            ready, _, _ = select.select(fds, [], [], POLL_INTERVAL)
        except (OSError, ValueError):  # the socket closed under us: let the loop find out
            return
        self._readable = raw is not None and raw in ready
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, OSError):
                pass


# -- the association thread -----------------------------------------------------------------------

class WakingAssociation(Association):
    """An acceptor association whose thread sleeps until its DUL has something for it.

    Its loop repeats pynetdicom's ``Association._run_reactor`` check for check, with the 1 ms
    sleep replaced by an event that :class:`WakingUpperLayer` sets.
    """

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
        """pynetdicom's acceptor loop, waiting on :attr:`_wakeup` instead of sleeping 1 ms."""
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


class WakingRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating a :class:`WakingAssociation` for each connection.

    :meth:`_create_association` is pynetdicom's, with the association class changed, the
    kernel keeping the network timeout (:func:`scp_node.dimse.transport.use_kernel_timeouts`),
    and the node's supported contexts shared instead of deep-copied.
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


# -- the DIMSE provider ---------------------------------------------------------------------------

class ReceivingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, receiving each data set into a
    :class:`~scp_node.dimse.buffer.DataSetBuffer` and serving plain C-STORE requests on the
    thread that received them."""

    #: Serve a complete C-STORE request on the thread that received it (see :meth:`_serve_store`).
    serve_stores_here = True

    def __init__(self, assoc: Any, spool_dir: Path | None = None) -> None:
        super().__init__(assoc)
        self.spool_dir = spool_dir

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            # A handler watching received messages reads their pydicom command set: then
            # pynetdicom decodes every command (StoreRequestMessage hands anything else to it).
            watched = bool(self.assoc.get_handlers(evt.EVT_DIMSE_RECV))
            message = DIMSEMessage() if watched else StoreRequestMessage.new()
            message.data_set = DataSetBuffer(self.spool_dir, lambda: self._header_for(message))
            self.message = message
        super().receive_primitive(primitive)
        if self.serve_stores_here:
            self._serve_store()

    def _serve_store(self) -> None:
        """Serve a C-STORE request that just became complete, on this (the DUL) thread.

        pynetdicom hands each complete message to the association's own thread, and that thread
        hands the response back to the DUL thread to be sent: two thread hand-overs (a wake-up
        and a context switch each, and a fight for the GIL) for every instance.  A peer waits for
        the response before it sends the next request (one operation at a time is all we
        negotiate), so the DUL thread has nothing else to do meanwhile: it runs the storage
        service itself, and the response it queues is sent on its next turn.  Anything but a
        C-STORE request on an accepted context goes to the association thread as before.
        """
        queued = self.msg_queue
        with queued.mutex:
            if not queued.queue:
                return
            context_id, msg = queued.queue[0]
            assoc = self.assoc
            if (not isinstance(msg, C_STORE) or msg.MessageIDBeingRespondedTo is not None
                    or context_id not in assoc._accepted_cx or assoc._sent_release or not assoc.is_established):
                return
            queued.queue.popleft()
        assoc._serve_request(msg, context_id)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; a plain C-STORE success response is encoded directly.

        That response is sent once per received instance, and pynetdicom builds it through a
        pydicom Dataset and pydicom's writer (about 0.25 ms).  Anything else -- a failure
        status with its comment, another message, a bound ``EVT_DIMSE_SENT`` handler, a peer
        PDU too small for it -- goes through pynetdicom unchanged.
        """
        encoded = store_success_command(primitive)
        max_pdu = self.maximum_pdu_size
        if (encoded is None or (max_pdu and len(encoded) + 6 > max_pdu)
                or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            super().send_msg(primitive, context_id)
            return
        dul = self.dul
        if threading.current_thread() is dul and self._sends_directly():
            # Served on the DUL thread (see _serve_store): DT-1 is "send the P-DATA-TF PDU", so
            # send it now instead of queueing it for this very thread's next turn.
            dul.socket.send(P_DATA_TF_HEADER.pack(0x04, 0, len(encoded) + 6, len(encoded) + 2, context_id, 0x03)
                            + encoded)  # (a failed send queues Evt17, as pynetdicom's does)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))  # last command fragment
        dul.send_pdu(pdata)

    def _sends_directly(self) -> bool:
        """Sta6, nothing queued to send before it, and no handler watching PDUs, data or
        transitions: sending the PDU is all the state machine would do."""
        dul = self.dul
        if dul.state_machine.current_state != "Sta6" or dul.to_provider_queue.qsize() or dul.socket is None:
            return False
        return not any(self.assoc.get_handlers(event) for event in _WATCHING_SENT)

    def _header_for(self, message: DIMSEMessage) -> bytes:
        cs = getattr(message, "request", None) or message.command_set
        context = self.assoc._accepted_cx[message.context_id]
        return part10_header(str(cs.AffectedSOPClassUID), str(cs.AffectedSOPInstanceUID),
                             str(context.transfer_syntax[0]), str(self.assoc.requestor.ae_title or ""))

    def discard_partial(self) -> None:
        """Remove what an unfinished message left (called when the connection is gone)."""
        message = self.message
        if message is not None and isinstance(message.data_set, DataSetBuffer):
            if message.data_set.spilled:
                log.info("removing the spool file of a data set the association did not finish")
            message.data_set.discard()


class StoreRequestMessage(DIMSEMessage):
    """A received DIMSE message that reads a plain C-STORE request's command set itself.

    pynetdicom decodes every command set with pydicom and then copies it, element by element and
    through validating setters, into a primitive: about 0.12 ms for each received instance.  A
    C-STORE-RQ command set has seven elements (PS3.7 table 9.3-1), so when the last command
    fragment completes one that holds exactly those (:func:`scp_node.dimse.commands.store_request`),
    the request primitive is built here and the data set fragments follow into the buffer.  Any
    other command -- another message, Move Originator fields, an odd length, a value pynetdicom
    would refuse -- goes to pynetdicom's own decoding from that fragment on, which then turns this
    object into its own message class as it always does.
    """

    #: The request primitive (without its data set) once the command set was read here.
    request: C_STORE | None = None

    @classmethod
    def new(cls) -> StoreRequestMessage:
        """A new message (pynetdicom's constructor accepts only its own class names; it turns a
        plain DIMSEMessage into the decoded message's class the same way)."""
        message = DIMSEMessage()
        message.__class__ = cls
        return message  # type: ignore[return-value]

    def decode_msg(self, primitive: P_DATA, assoc: Any = None) -> bool:
        items = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(items):
            control = data[0]
            if self.request is None:
                if control & 3 == 3:  # the last command fragment: which message is it?
                    command = self.encoded_command_set.getvalue() + bytes(data[1:])
                    self.request = store_request(command)
                    if self.request is None:
                        return self._pynetdicom_from(items, index, assoc)
                    self.context_id = context_id  # (the encoded command set is not needed again)
                elif control & 1:  # a command fragment, more to come
                    self.encoded_command_set.write(data[1:])
                else:  # data before its command: pynetdicom's call
                    return self._pynetdicom_from(items, index, assoc)
            elif control & 1:
                raise ValueError("a command fragment arrived inside a C-STORE data set")
            else:
                self.data_set.write(data[1:])
                if control & 2:
                    return True
        return False

    def _pynetdicom_from(self, items: list[Any], index: int, assoc: Any) -> bool:
        rest = P_DATA()
        rest._presentation_data_value_list = items[index:]
        return DIMSEMessage.decode_msg(self, rest, assoc)

    def message_to_primitive(self) -> Any:
        if self.request is None:  # pragma: no cover - only reached through pynetdicom's class
            return super().message_to_primitive()
        request = self.request
        request.DataSet = self.data_set
        request._context_id = self.context_id
        return request
