"""Association negotiation for a request seen before: the same answer, not worked out again.

A modality that opens an association per image sends the same A-ASSOCIATE-RQ every time, and for
each one pynetdicom turned the decoded request into a primitive (a UID object and a validation per
abstract and transfer syntax), negotiated its ~120 presentation contexts against the node's and
built and encoded the A-ASSOCIATE-AC from scratch: together half of the CPU such an association
cost.  Each of these steps is a pure function of its input, so each is remembered by its
input's *content* (the last :data:`REMEMBERED` of each, most recently used kept):

- :func:`negotiated` -- pynetdicom's presentation context negotiation (the fast path hands out
  copies of what it returns: :mod:`scp_node.dimse.pynetdicom_internals`, which also remembers
  the request primitive of a decoded A-ASSOCIATE-RQ);
- :func:`accept_pdu_bytes` -- the encoded A-ASSOCIATE-AC for an accept primitive (AE-7).

This module reads pynetdicom's objects through their public attributes only.  The tests compare
every output with what pynetdicom computes for the same input.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

from pynetdicom import presentation as _presentation
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

#: How many different inputs each step remembers (a node hears a handful of distinct requests).
REMEMBERED = 16


class _Remembered:
    """A small thread-safe map that forgets the least recently used key beyond ``size``."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# -- presentation context negotiation ---------------------------------------------------------

_negotiated = _Remembered()


def _supported_key(ac_contexts: list[PresentationContext]) -> Hashable:
    """The part of the key for the supported contexts: worked out once for a list the node's
    associations share (it is fixed while the server serves; see scp_node.dimse.listener)."""
    key = getattr(ac_contexts, "negotiation_key", None)
    if key is None:
        key = tuple((cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role)
                    for cx in ac_contexts)
        if getattr(ac_contexts, "shared_by_associations", False):
            ac_contexts.negotiation_key = key  # type: ignore[attr-defined]
    return key


def _negotiation_key(rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext],
                     roles: dict[Any, Any] | None) -> Hashable:
    """Everything :func:`pynetdicom.presentation.negotiate_as_acceptor` reads of its input."""
    return (tuple((cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in rq_contexts),
            _supported_key(ac_contexts), tuple(sorted((roles or {}).items())))


def negotiated(rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext],
               roles: dict[Any, Any] | None = None) -> tuple[list[PresentationContext], list[Any]]:
    """pynetdicom's negotiation of a proposal against the supported contexts, remembered.

    The objects returned are the remembered ones, shared: a caller hands out copies.
    """
    try:  # (the key is hashed once, by the look-up: a tuple does not keep its hash)
        key = _negotiation_key(rq_contexts, ac_contexts, roles)
        known = _negotiated.get(key)
    except (AttributeError, TypeError):  # something unusual: no shortcut
        return _presentation.negotiate_as_acceptor(rq_contexts, ac_contexts, roles)
    if known is None:
        known = _presentation.negotiate_as_acceptor(rq_contexts, ac_contexts, roles)
        _negotiated.put(key, known)
    return known


# -- AE-7: the encoded A-ASSOCIATE-AC ---------------------------------------------------------

_accept_pdus = _Remembered()


def _accept_key(primitive: A_ASSOCIATE) -> Hashable:
    """Everything ``A_ASSOCIATE_AC.from_primitive`` and its items read of the primitive."""
    return (primitive.application_context_name, primitive.calling_ae_title, primitive.called_ae_title,
            tuple((cx.context_id, cx.result, tuple(cx.transfer_syntax[:1]))
                  for cx in primitive.presentation_context_definition_results_list),
            tuple((type(item), tuple(sorted(vars(item).items()))) for item in primitive.user_information))


def accept_pdu_bytes(primitive: A_ASSOCIATE) -> bytes:
    """The encoded A-ASSOCIATE-AC PDU for the accept ``primitive`` (as ``A_ASSOCIATE_AC(primitive)
    .encode()``), remembered by the primitive's content."""
    try:
        key = _accept_key(primitive)
        data = _accept_pdus.get(key)
    except (AttributeError, TypeError):
        return A_ASSOCIATE_AC(primitive).encode()
    if data is None:
        data = A_ASSOCIATE_AC(primitive).encode()
        _accept_pdus.put(key, data)
    return data


def forget() -> None:
    """Drop everything remembered (tests; a reconfigured AE needs nothing of the kind: its
    supported contexts are part of the negotiation key)."""
    _negotiated.clear()
    _accept_pdus.clear()
