"""A test HIS/RIS: hl7apy's own MLLP server on loopback, answering each ORU^R01 as a test says.

Every message received is kept (as ER7 text); the answer is an ACK built by hl7apy with the code
the test set (AA, AE, AR), or nothing at all (``"silent"``: the connection stays open until the
sender gives up), or an ACK for another message (``"wrong-id"``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message


@dataclass
class Receiver:
    """What the listener got and how it answers; ``answers`` is used first, then ``answer``."""

    answer: str = "AA"
    answers: list[str] = field(default_factory=list)
    text: str = ""
    received: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)

    def next_answer(self) -> str:
        with self.lock:
            return self.answers.pop(0) if self.answers else self.answer

    def messages(self) -> list[Message]:
        """Every received message, parsed strictly as HL7 v2.5.1 (groups found)."""
        with self.lock:
            raw = list(self.received)
        return [parse_message(m, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True) for m in raw]


def ack_for(message: str, code: str, text: str = "") -> Message:
    """An original-mode ACK (hl7apy) answering ``message`` with ``code``."""
    incoming = parse_message(message, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = "TESTRIS"
    ack.msh.msh_5 = incoming.msh.msh_3.to_er7() or "SCPNODE"
    ack.msh.msh_7 = datetime.now().strftime("%Y%m%d%H%M%S")
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = "ACK" + incoming.msh.msh_10.to_er7()[:17]
    ack.msh.msh_11 = "P"
    ack.msh.msh_12 = "2.5.1"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = incoming.msh.msh_10.to_er7()
    if text:
        ack.msa.msa_3 = text
    if code in ("AE", "AR", "CE", "CR"):
        err = ack.add_segment("ERR")
        err.err_3 = "207^Application internal error^HL70357"
        err.err_4 = "E"
        if text:
            err.err_8 = text
    return ack


def _handler(receiver: Receiver) -> type[AbstractHandler]:
    class Handler(AbstractHandler):
        def reply(self) -> str:
            msg = self.incoming_message
            with receiver.lock:
                receiver.received.append(msg)
            answer = receiver.next_answer()
            if answer == "silent":
                receiver.stopped.wait(60)
                raise RuntimeError("silent: no answer")  # the server closes the connection
            if answer == "wrong-id":
                ack = ack_for(msg, "AA")
                ack.msa.msa_2 = "SOMETHINGELSE"
                return ack.to_mllp()
            return ack_for(msg, answer, receiver.text).to_mllp()

    return Handler


class MLLPListener:
    """``with MLLPListener() as (port, receiver):`` an hl7apy MLLPServer on 127.0.0.1."""

    def __init__(self, answer: str = "AA", host: str = "127.0.0.1", port: int = 0) -> None:
        self.receiver = Receiver(answer=answer)
        handlers = {"ORU^R01^ORU_R01": (_handler(self.receiver),)}
        self.server = MLLPServer(host, port, handlers, timeout=30)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="test-mllp", daemon=True)

    def __enter__(self) -> tuple[int, Receiver]:
        self._thread.start()
        return self.port, self.receiver

    def __exit__(self, *exc: object) -> None:
        self.receiver.stopped.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def listen(answer: str = "AA") -> Iterator[tuple[int, Receiver]]:
    with MLLPListener(answer) as pair:
        yield pair
