"""The DIMSE listener: one AE (the one place for network config) serving C-ECHO and C-STORE.

Every receiver process (see :mod:`scp_node.dimse.receivers`) runs one :class:`DimseListener` on the
listening socket the node process opened.  ``[node] fast_path`` picks how associations run: the
fast path of :mod:`scp_node.dimse.pynetdicom_internals` (default), or pynetdicom's own request
handler, reactor, negotiation and DIMSE provider (``false``).  ``[node] max_associations`` holds for the node as a
whole: each receiver publishes how many associations it has in a slot of a shared array, and a
request is counted against the sum.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from .. import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from ..audit import AuditTrail
from ..config import Config
from ..handlers import (AccessList, handle_aborted, handle_accepted, handle_conn_open, handle_echo,
                        handle_requested, handle_store)
from ..handlers.association import AssociationCounts, live_acceptors
from ..store.ingest import KNOWN_TRANSFER_SYNTAXES, Ingestor
from . import pynetdicom_internals as internals
from .tls import defer_handshakes, server_context
from .transport import ListenError, open_listening_socket  # noqa: F401 (the node opens the port through here)

#: Spool folder for large incoming data sets, inside the storage folder (start-up recovery
#: removes what a crash left there: the files are named ``.<random>.spool.tmp``).
SPOOL_FOLDER = ".spool"

log = logging.getLogger(__name__)


#: Transfer syntaxes in pydicom's dictionary that are not encodings of a data set a DIMSE peer
#: sends (MIME and XML encapsulation for web services, the Papyrus 3 file format): never negotiated.
NOT_FOR_DIMSE = frozenset({"1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"})


def _uid_order(uid: str) -> tuple[int, ...]:
    return tuple(int(part) for part in uid.split("."))


def supported_transfer_syntaxes() -> list[str]:
    """Every transfer syntax the ingest knows (:data:`scp_node.store.ingest.KNOWN_TRANSFER_SYNTAXES`:
    pynetdicom's list, then pydicom's dictionary with the retired ones, such as the JPEG processes
    6/8 and 10/12 that pynetdicom leaves out), less :data:`NOT_FOR_DIMSE`.  The node stores a data
    set as received, so it accepts what it can store, whether or not the engine can decode it
    (an undecodable series is stored and reported as not analysable)."""
    extra = sorted(KNOWN_TRANSFER_SYNTAXES - set(ALL_TRANSFER_SYNTAXES) - NOT_FOR_DIMSE, key=_uid_order)
    return [*(str(ts) for ts in ALL_TRANSFER_SYNTAXES), *extra]


def preferred_transfer_syntaxes() -> list[str]:
    """Every supported transfer syntax, encapsulated (compressed) ones first, Implicit VR last.

    pynetdicom as acceptor picks, within one proposed presentation context, the first syntax of
    *its own* list that the sender proposed.  A modality holding a JPEG 2000 image proposes it
    first and uncompressed as a fallback; preferring the encapsulated syntaxes means it sends
    the image as it has it, and we store exactly those bytes, with no transcoding on either side.
    """
    every = supported_transfer_syntaxes()
    encapsulated = [ts for ts in every if UID(ts).is_encapsulated]
    native = [ts for ts in every if not UID(ts).is_encapsulated and ts != ImplicitVRLittleEndian]
    return encapsulated + native + [ImplicitVRLittleEndian]


def remember_uid_validity() -> None:
    """Memoise :attr:`pydicom.uid.UID.is_valid` in this process (undone by :func:`forget_uid_validity`).

    pynetdicom's ``set_uid`` asks ``UID.is_valid`` (a regular expression, looked up in ``re``'s
    cache on every call) for each UID it sets, several times per proposed presentation context:
    about a thousand matches for an A-ASSOCIATE-RQ from storescu's 120 contexts, a sixth of a
    one-image association's CPU (py-spy).  The same few hundred UIDs come in every association,
    and validity depends on the string alone, so the answer is remembered (LRU, 8192 strings).
    """
    if "_scp_node_original_is_valid" in UID.__dict__:
        return
    original = UID.__dict__["is_valid"]
    check = original.fget
    remembered = functools.lru_cache(maxsize=8192)(lambda text: bool(check(UID(text))))
    UID.is_valid = property(lambda self: remembered(str.__str__(self)))  # type: ignore[method-assign,assignment]
    UID._scp_node_original_is_valid = original  # type: ignore[attr-defined]


def forget_uid_validity() -> None:
    """Give :class:`pydicom.uid.UID` its own ``is_valid`` back."""
    original = UID.__dict__.get("_scp_node_original_is_valid")
    if original is not None:
        UID.is_valid = original  # type: ignore[method-assign]
        del UID._scp_node_original_is_valid  # type: ignore[attr-defined]


class ReceiveSettings:
    """The process-wide settings of the receive path: applied when the first listener of a process
    starts, undone when the last one stops (a test that runs a listener leaves nothing behind).

    - pynetdicom (:func:`scp_node.dimse.pynetdicom_internals.configure_library`): how data sets
      are received, its standard logging handlers off; the negotiation memo in its ACSE (fast path).
    - pydicom: :func:`remember_uid_validity`, and ``reading_validation_mode = IGNORE``.  pydicom
      checks a UID against a regular expression each time it reads one, and pynetdicom reads each
      proposed UID several times while it decodes and negotiates an A-ASSOCIATE-RQ: with one
      association per image that was a third of a receiver's CPU (py-spy).

    Why they may hold for the whole process while it receives -- the node process also runs the
    engine, the SR writer and the export SCU: the memoised ``is_valid`` gives the same answer for
    every string (``tests/dimse/test_listener.py`` compares it with pydicom's on valid and invalid
    UIDs); the reading validation mode only decides whether pydicom *warns* about a value it reads,
    never what it reads, and in this process pydicom's warnings are withheld from the log anyway
    (:class:`scp_node.logs.WithholdPatientData`); the SRs are checked by the *writing* validation
    mode, which is left alone; the UIDs the node relies on are checked by
    :func:`scp_node.store.files.check_uid`.  pynetdicom's settings concern acceptor associations
    and its logging; the export SCU negotiates as requestor.  The receiver child processes only
    receive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[Any, ...] = ()

    def apply(self, fast_path: bool) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            self._saved = (pydicom_config.settings.reading_validation_mode, internals.library_settings())
            pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
            remember_uid_validity()
            internals.configure_library(fast_path)
            internals.install_negotiation_memo(fast_path)  # a request seen before is negotiated from memory

    def undo(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users:
                return
            mode, library = self._saved
            pydicom_config.settings.reading_validation_mode = mode
            forget_uid_validity()
            internals.restore_library_settings(library)


#: The one instance per process.
RECEIVE_SETTINGS = ReceiveSettings()


class _ContextList(list):  # type: ignore[type-arg]
    """The supported presentation contexts, with a fast ``deepcopy``.

    pynetdicom deep-copies the server's contexts for every association.  For every storage SOP
    class with every transfer syntax (121 contexts, 5,445 UIDs) ``copy.deepcopy`` takes ~25 ms of
    CPU under the interpreter lock — per association, which is per instance for the many
    modalities that open one association per image.  UIDs are immutable strings, so a copy of each
    context object with fresh lists is the same thing, in ~0.13 ms.

    On the fast path the node's own associations do not even take that copy
    (``shared_by_associations``, read by
    :class:`scp_node.dimse.pynetdicom_internals.WakingRequestHandler`): during an association the supported
    contexts are only read, by the negotiation, which builds new result contexts, and no
    handler of the node touches them.  The list is fixed once the server serves.
    """

    shared_by_associations = True

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copies = []
        for cx in self:
            new = object.__new__(type(cx))
            new.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in vars(cx).items()})
            copies.append(new)
        return copies


#: How long a receiver with more associations than another lets the other take a new connection.
_YIELD_SECONDS = 0.005
_YIELD_TRIES = 4
#: A connection accepted this recently may not show in live_acceptors() yet.
_RECENT_SECONDS = 0.05
#: How often a receiver runs a full garbage collection (see _SharedSocketServer.service_actions).
_FULL_GC_SECONDS = 60.0


class _SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server on a socket that is already listening."""

    def __init__(self, *args: Any, listening: socket.socket, counts: AssociationCounts | None,
                 spool_dir: Path | None = None, **kwargs: Any) -> None:
        self._listening = listening
        self._counts = counts
        #: Where data sets too large for memory are spooled (on the storage file system, so
        #: that keeping one is a hard link, not a copy).
        self.spool_dir = spool_dir
        self._accepted_at: deque[float] = deque(maxlen=16)
        self._last_gc = time.monotonic()
        super().__init__(*args, **kwargs)
        self.contexts = _ContextList(self.contexts)

    def server_bind(self) -> None:
        self.socket.close()  # the fresh socket TCPServer made: ours is already bound
        self.socket = socket.socket(fileno=os.dup(self._listening.fileno()))
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # already listening

    def server_close(self) -> None:
        # Only our descriptor: shutdown() would stop the listening socket for every receiver.
        self.socket.close()

    def service_actions(self) -> None:
        """Collect dead associations' reference cycles at most once a minute.

        pynetdicom's server runs a full ``gc.collect()`` every 60 turns of its accept loop (a turn
        per connection, and every 0.5 s when idle).  A full collection walks the whole heap under
        the interpreter lock — in the node process the model's and torch's objects too: with one
        association per image that was 31 % of the receiver's CPU (py-spy).  Python's own
        generational collector runs in between.
        """
        now = time.monotonic()
        if now - self._last_gc >= _FULL_GC_SECONDS:
            self._last_gc = now
            gc.collect()

    def _load(self) -> int:
        """Live associations, plus connections accepted so recently that they may not show yet."""
        now = time.monotonic()
        return live_acceptors(self.ae) + sum(1 for t in self._accepted_at if now - t < _RECENT_SECONDS)

    def get_request(self) -> tuple[socket.socket, Any]:
        if self._counts is not None:
            # Every receiver wakes for a new connection and the first to call accept() gets it: the
            # busiest would take them all, and one process (one GIL) with three of four senders
            # sets the pace for all of them.  One that has more than another waits (up to 20 ms)
            # for the less busy one to take it, then takes it itself if it is still there.
            for _ in range(_YIELD_TRIES):
                if self._load() <= self._counts.fewest_elsewhere():
                    break
                time.sleep(_YIELD_SECONDS)
        client, address = self.socket.accept()
        self._accepted_at.append(time.monotonic())
        # An accepted socket must block (with the AE's network timeout), whatever the listener is.
        client.settimeout(self.ae.network_timeout)
        return client, address


class DimseListener:
    """The AE and its server in one process: handlers bound, TLS set up, stopped gracefully."""

    def __init__(self, config: Config, audit: AuditTrail, ingestor: Ingestor, listening: socket.socket,
                 counts: AssociationCounts | None = None) -> None:
        self.config = config
        self.audit = audit
        self.ingestor = ingestor
        self.listening = listening
        self.counts = counts
        self.ae = self._make_ae()
        self._server: Any = None
        self._publisher: threading.Thread | None = None
        self._stopped = threading.Event()
        self._settings_applied = False

    def _make_ae(self) -> AE:
        n = self.config.node
        ae = AE(ae_title=n.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = n.max_pdu_size
        # The limit itself is checked (and audited) in handle_requested; pynetdicom's count also
        # holds closed connections waiting out their ACSE timeout, so its ceiling is a safety net.
        ae.maximum_associations = n.max_associations + 64
        ae.acse_timeout = n.acse_timeout
        ae.dimse_timeout = n.dimse_timeout
        ae.network_timeout = n.network_timeout
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, preferred_transfer_syntaxes())
        return ae

    def _handlers(self) -> list[Any]:
        n = self.config.node
        acl = AccessList(self.config.peers, accept_unknown=n.accept_unknown_callers)
        return ([] if n.fast_path else internals.library_path_handlers()) + [
            (evt.EVT_CONN_OPEN, handle_conn_open, [n.max_pdu_size, self.audit, acl, n.ae_title]),
            (evt.EVT_REQUESTED, handle_requested, [acl, n.ae_title, self.audit, n.max_associations, self.counts]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.audit]),
            (evt.EVT_ABORTED, handle_aborted, [self.audit]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingestor, self.audit]),
        ]

    def start(self) -> None:
        """Serve on the shared socket (raises :class:`scp_node.dimse.tls.TLSConfigError` on a bad TLS setup)."""
        n = self.config.node
        tls = server_context(n)  # (raises before anything is changed)
        RECEIVE_SETTINGS.apply(n.fast_path)
        self._settings_applied = True
        extra: dict[str, Any] = {"request_handler": internals.WakingRequestHandler} if n.fast_path else {}
        server = self.ae.make_server((n.host, n.port), ssl_context=tls, evt_handlers=self._handlers(),
                                     server_class=_SharedSocketServer, listening=self.listening,
                                     counts=self.counts, spool_dir=self.config.store.storage_dir / SPOOL_FOLDER,
                                     **extra)
        if tls is not None:
            defer_handshakes(server, tls)
        thread = threading.Thread(target=make_target(server.serve_forever), name="AcceptorServer", daemon=True)
        thread.start()
        internals.register_server(self.ae, server)
        self._server = server
        log.info("associations run on %s", "the fast path" if n.fast_path
                 else "pynetdicom's own path ([node] fast_path = false)")
        if self.counts is not None:
            self._publisher = threading.Thread(target=self._publish_count, name="AssociationCount", daemon=True)
            self._publisher.start()

    def _publish_count(self) -> None:
        """Keep this receiver's slot current as associations end (a request updates it at once)."""
        assert self.counts is not None
        while not self._stopped.wait(0.25):
            # Live associations only: the slots are what max_associations is checked against.
            self.counts.publish(live_acceptors(self.ae))

    def stop(self, grace: float) -> None:
        """Stop accepting, let open associations end (a store in flight is answered), abort the rest."""
        self._stopped.set()
        try:
            if self._server is not None:
                self._stop(grace)
        finally:
            if self._settings_applied:
                self._settings_applied = False
                RECEIVE_SETTINGS.undo()

    def _stop(self, grace: float) -> None:
        self._server.shutdown()  # stops accepting here (the shared socket stays open for the others)
        self._server = None
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._open_associations():
            time.sleep(0.1)
        for assoc in self._open_associations():
            log.warning("aborting an association still open at stop")
            assoc.abort()
        if self.counts is not None:
            self.counts.publish(0)

    def _open_associations(self) -> list[Any]:
        # A connection that already closed (a port probe) keeps its thread until the ACSE
        # timeout; it has nothing to finish (state Sta1), so it is not waited for.
        return [a for a in self.ae.active_associations
                if a.is_alive() and a.dul.state_machine.current_state != "Sta1"]
