"""Receiving a C-STORE data set: in memory while it is small, in a spool file once it is not.

pynetdicom offers two ways to receive a data set: all of it in memory (a 2 GiB multi-frame
would be held whole), or every one in a temporary file (``STORE_RECV_CHUNKED_DATASET``), which
for an ordinary CT slice cost a temporary file, a pydicom-written File Meta header, a flush per
fragment and a read back: about a tenth of the receive path's CPU.  :class:`DataSetBuffer` does
both: fragments go to memory up to :data:`IN_MEMORY_LIMIT` bytes; the fragment that would cross
it moves everything to a Part 10 spool file (header first), and the rest of the data set is
appended there, so memory stays bounded whatever the sender sends.

:class:`ReceivingDIMSE` gives each incoming message such a buffer, reads the command set of a
plain C-STORE request itself (:class:`StoreRequestMessage`), and encodes the plain C-STORE
success response itself (:meth:`ReceivingDIMSE.send_msg`); the C-STORE handler then
takes the bytes (:meth:`DataSetBuffer.part10_bytes`) or the spool file
(:attr:`DataSetBuffer.path`) and discards the buffer when done.  A data set cut off by an abort
never completes: its spool file is removed when the association's DUL thread ends.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from .store.ingest import IN_MEMORY_PARSE_LIMIT
from .store.part10 import part10_header

log = logging.getLogger(__name__)

#: Data sets up to this size are received in memory; larger ones are spooled to disk.  The same
#: bound as the ingest's in-memory parse: a spooled file is always parsed from disk.
IN_MEMORY_LIMIT = IN_MEMORY_PARSE_LIMIT


class DataSetBuffer(io.BytesIO):
    """The data set of one incoming DIMSE message, spilling to a spool file past ``limit`` bytes.

    ``header`` is called once, at the spill, for the Part 10 header that starts the spool file
    (the command set, and so the SOP Class and Instance, is always complete by then).
    """

    def __init__(self, spool_dir: Path | None, header: Callable[[], bytes], limit: int | None = None) -> None:
        super().__init__()
        self._spool_dir = spool_dir
        self._header = header
        self._limit = IN_MEMORY_LIMIT if limit is None else limit
        self._file: Any = None
        #: The Part 10 spool file once the data set outgrew memory, else None.
        self.path: Path | None = None

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def write(self, data: Any) -> int:  # type: ignore[override]
        if self._file is None:
            if self.tell() + len(data) <= self._limit:
                return super().write(data)
            self._spill()
        return self._file.write(data)

    def _spill(self) -> None:
        if self._spool_dir is not None:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".", suffix=".spool.tmp", dir=self._spool_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=1024 * 1024)
        self._file.write(self._header())
        with self.getbuffer() as view:
            self._file.write(view)
        self.seek(0)
        self.truncate()

    def finish(self) -> None:
        """The last fragment is in: close the spool file (its bytes are then all on the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def part10_bytes(self) -> bytes:
        """The whole Part 10 instance of an in-memory data set (header + data set)."""
        if self.spilled:
            raise ValueError("the data set was spooled to a file: use .path")
        return self._header() + self.getvalue()

    def discard(self) -> None:
        """Drop the data: close and remove the spool file, free the memory."""
        self.finish()
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None
        self.seek(0)
        self.truncate()


class ReceivingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, receiving each data set into a :class:`DataSetBuffer`."""

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

    #: Serve a complete C-STORE request on the thread that received it (see :meth:`_serve_store`).
    serve_stores_here = True

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
        encoded = _store_success_command(primitive)
        max_pdu = self.maximum_pdu_size
        if (encoded is None or (max_pdu and len(encoded) + 6 > max_pdu)
                or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            super().send_msg(primitive, context_id)
            return
        dul = self.dul
        if threading.current_thread() is dul and self._sends_directly():
            # Served on the DUL thread (see _serve_store): DT-1 is "send the P-DATA-TF PDU", so
            # send it now instead of queueing it for this very thread's next turn.
            dul.socket.send(_P_DATA_TF_HEADER.pack(0x04, 0, len(encoded) + 6, len(encoded) + 2, context_id, 0x03)
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
    fragment completes one that holds exactly those (:func:`store_request`), the request
    primitive is built here and the data set fragments follow into the buffer.  Any other
    command -- another message, Move Originator fields, an odd length, a value pynetdicom would
    refuse -- goes to pynetdicom's own decoding from that fragment on, which then turns this
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


_C_STORE_RQ_ELEMENTS = (0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000)


def store_request(command: bytes) -> C_STORE | None:
    """The C-STORE request primitive of an encoded command set (implicit VR little endian), or
    None unless it holds exactly the seven elements of a C-STORE-RQ with well-formed values."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    try:
        while pos < end:
            group, element, length = _ELEMENT_HEADER.unpack_from(command, pos)
            pos += 8
            if group != 0x0000 or element in values or pos + length > end:
                return None
            values[element] = command[pos:pos + length]
            pos += length
    except struct.error:
        return None
    if tuple(sorted(values)) != _C_STORE_RQ_ELEMENTS:
        return None
    us = {e: values[e] for e in (0x0100, 0x0110, 0x0700, 0x0800)}
    if len(values[0x0000]) != 4 or any(len(v) != 2 for v in us.values()):
        return None
    if struct.unpack("<I", values[0x0000])[0] != end - 12:  # Command Group Length: what follows it
        return None
    field, message_id, priority, data_set_type = (struct.unpack("<H", us[e])[0] for e in (0x0100, 0x0110, 0x0700, 0x0800))
    if field != 0x0001 or data_set_type == 0x0101 or priority not in (0, 1, 2):
        return None
    try:
        sop_class = values[0x0002].rstrip(b"\0 ").decode("ascii")
        sop_instance = values[0x1000].rstrip(b"\0 ").decode("ascii")
    except UnicodeDecodeError:
        return None
    if not (len(sop_class) <= 64 and len(sop_instance) <= 64 and _UID.fullmatch(sop_class)
            and _UID.fullmatch(sop_instance)):
        return None
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = priority
    return request


_ELEMENT_HEADER = struct.Struct("<HHI")
#: A P-DATA-TF PDU with one PDV: type, reserved, PDU length; item length, context ID, control header.
_P_DATA_TF_HEADER = struct.Struct(">BBLLBB")
_WATCHING_SENT = (evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_FSM_TRANSITION)
#: A UID pynetdicom accepts without a word (PS3.5 9.1): digits and dots, 64 characters at most.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _implicit(group_element: int, value: bytes) -> bytes:
    """One implicit VR little endian element of the command group (0000,eeee)."""
    return struct.pack("<HHI", 0x0000, group_element, len(value)) + value


def _command_uid(value: Any) -> bytes | None:
    raw = str(value or "").encode("ascii", "strict") if value else b""
    if not raw or len(raw) > 64:
        return None
    return raw + b"\0" if len(raw) % 2 else raw


def _store_success_command(primitive: Any) -> bytes | None:
    """The encoded command set of a C-STORE-RSP with status Success, or None for anything else.

    PS3.7 table 9.3-2: Affected SOP Class UID, Command Field 8001H, Message ID Being Responded
    To, Command Data Set Type 0101H (no data set), Status, Affected SOP Instance UID.
    """
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status != 0x0000 or getattr(primitive, "ErrorComment", None) \
            or getattr(primitive, "OffendingElement", None):
        return None
    try:
        sop_class = _command_uid(primitive.AffectedSOPClassUID)
        sop_instance = _command_uid(primitive.AffectedSOPInstanceUID)
    except UnicodeEncodeError:
        return None
    if sop_class is None or sop_instance is None:
        return None
    body = b"".join((
        _implicit(0x0002, sop_class),
        _implicit(0x0100, struct.pack("<H", 0x8001)),
        _implicit(0x0120, struct.pack("<H", int(primitive.MessageIDBeingRespondedTo))),
        _implicit(0x0800, struct.pack("<H", 0x0101)),
        _implicit(0x0900, struct.pack("<H", 0x0000)),
        _implicit(0x1000, sop_instance),
    ))
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def take_dataset(request: Any) -> DataSetBuffer | None:
    """The :class:`DataSetBuffer` of a C-STORE request received by :class:`ReceivingDIMSE`."""
    buffer = getattr(request, "DataSet", None)
    if isinstance(buffer, DataSetBuffer):
        buffer.finish()
        return buffer
    return None
