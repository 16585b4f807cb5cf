"""The C-STORE command sets the fast path reads and writes itself (PS3.7 9.3.1, implicit VR
little endian): a plain C-STORE-RQ read without pydicom, a C-STORE-RSP with status Success encoded
directly.  Anything else is left to pynetdicom; the tests byte-compare both with pynetdicom's.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from pynetdicom.dimse_primitives import C_STORE

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


def store_success_command(primitive: Any) -> bytes | None:
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
