"""An A-ASSOCIATE-RQ with 2,000 presentation contexts of made-up, non-conformant UIDs, against
``scp-node serve`` as a subprocess.

pynetdicom warns for every non-conformant UID it decodes (five lines per context), and it decoded
all of them before the allow-list was asked: one such request from an unknown caller made
20,000 log lines.  Now the guard on the socket reads the AE titles at their fixed places in the
PDU and refuses an unknown caller before anything is decoded; an allowed peer's request is
decoded, and the repeat limit of :mod:`scp_node.logs` keeps its warnings to a handful.
"""

from __future__ import annotations

import socket
import sqlite3
import struct
from pathlib import Path

import pytest

from tests.support.node import start_node, write_config

pytestmark = pytest.mark.integration

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(calling: bytes, called: bytes, contexts: int, syntaxes_per_context: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ built by hand (pynetdicom's AE stops at 128 contexts): context IDs
    repeat, abstract and transfer syntaxes are made up and non-conformant (a leading zero)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT)
    for i in range(contexts):
        sub = _item(0x30, f"1.2.840.10008.05.{i}".encode())
        for j in range(syntaxes_per_context):
            sub += _item(0x40, f"1.2.840.10008.09.{i}.{j}".encode())
        body += _item(0x20, bytes([(2 * i + 1) % 256, 0, 0, 0]) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433"))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def send_request(port: int, pdu: bytes) -> bytes:
    """Send ``pdu``; return the node's answer (the first PDU it sends back, at most 10 bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(pdu)
        answer = b""
        while len(answer) < 10:
            chunk = s.recv(10 - len(answer))
            if not chunk:
                break
            answer += chunk
        return answer


#: A-ASSOCIATE-RJ: rejected-permanent (1), service-user (1), calling AE title not recognised (3).
RJ_CALLING_AE = struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 1, 1, 3)


def test_unknown_caller_with_2000_contexts_is_refused_before_decoding(tmp_path: Path, node_port: int,
                                                                      test_model_dir: Path) -> None:
    folder = tmp_path / "node"
    folder.mkdir()
    config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                          peers=[("GOODPEER", "127.0.0.1")])
    node = start_node(config, node_port)
    try:
        before = node.output().count("\n")
        answers = [send_request(node_port, associate_rq(b"EVIL", b"SCPNODE", 2000)),
                   send_request(node_port, associate_rq(b"EVIL", b"SCPNODE", 100, syntaxes_per_context=20))]
        unknown_lines = node.output().splitlines()[before:]
        # An allowed peer's request is decoded; its warnings are held back after a few per kind.
        accepted = send_request(node_port, associate_rq(b"GOODPEER", b"SCPNODE", 2000))
    finally:
        assert node.stop() == 0, node.output()[-3000:]
    assert answers == [RJ_CALLING_AE, RJ_CALLING_AE]
    assert accepted[:1] == b"\x02"  # A-ASSOCIATE-AC (every context refused: an abstract syntax we lack)
    assert not [ln for ln in unknown_lines if " pynetdicom." in ln], unknown_lines[:20]  # the library's loggers
    assert len([ln for ln in unknown_lines if "rejecting association from EVIL" in ln]) == 2
    about_them = [ln for ln in unknown_lines if " pynetdicom." in ln or " scp_node.handlers." in ln
                  or " scp_node.dimse.pynetdicom_internals:" in ln]
    assert len(about_them) <= 4, unknown_lines  # a rejection and a closed connection each; was 20,000 lines
    pynetdicom_lines = [ln for ln in node.output().splitlines() if " pynetdicom." in ln]
    # ~8 call sites, each 5 lines and one saying the rest is held back (unlimited: 10,000 lines)
    assert 0 < len(pynetdicom_lines) <= 60, pynetdicom_lines[:70]
    assert any("held back" in ln for ln in pynetdicom_lines)
    with sqlite3.connect(folder / "index.db") as con:
        rows = con.execute("select event, ae_title, detail from audit_events where event like 'association.%'"
                           " order by id").fetchall()
    rejected = [r for r in rows if r[0] == "association.rejected"]
    assert rejected == [("association.rejected", "EVIL", "calling AE title and address are not an allowed peer")] * 2
    assert not any("not a DICOM association request" in r[2] for r in rows)  # one row each, not two
