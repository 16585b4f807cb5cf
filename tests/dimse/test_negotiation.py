"""Remembered association negotiation (scp_node.dimse.negotiation): every output equals pynetdicom's own
for the same input, is a fresh copy, and real associations still get what they proposed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation)
from pynetdicom.presentation import build_context
from pynetdicom.presentation import negotiate_as_acceptor as pynetdicom_negotiate
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from scp_node.dimse import negotiation
from scp_node.dimse import pynetdicom_internals as internals
from scp_node.dimse.pynetdicom_internals import WakingRequestHandler


@pytest.fixture(autouse=True)
def _nothing_remembered() -> Iterator[None]:
    """Nothing remembered before or after a test, and pynetdicom's ACSE as it was."""
    saved = internals.library_settings()
    internals.forget()
    yield
    internals.forget()
    internals.restore_library_settings(saved)


def _contexts(cxs: list[Any]) -> list[tuple[Any, ...]]:
    return [(cx.context_id, cx.abstract_syntax, list(cx.transfer_syntax), cx.result, cx.as_scu, cx.as_scp)
            for cx in cxs]


def _items(items: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(type(item).__name__, vars(item)) for item in items]


def _request_pdu(calling: str = "MODALITY", roles: bool = False) -> A_ASSOCIATE_RQ:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "SCP_NODE"
    for i, cx in enumerate(StoragePresentationContexts[:40]):
        context = build_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        context.context_id = 2 * i + 1
        primitive.presentation_context_definition_list.append(context)
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [length, impl]
    if roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, True, True
        primitive.user_information.append(role)
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(A_ASSOCIATE_RQ(primitive).encode())  # as the upper layer has it: decoded from bytes
    return pdu


def test_a_remembered_request_primitive_is_a_fresh_copy_of_pynetdicoms() -> None:
    pdu = _request_pdu(roles=True)
    expected = A_ASSOCIATE_RQ.to_primitive(pdu)  # pynetdicom's own, from the PDU's items
    internals.remember_request_primitive(pdu)
    first, second = pdu.to_primitive(), pdu.to_primitive()
    for got in (first, second):
        assert (got.calling_ae_title, got.called_ae_title, got.application_context_name) == \
            (expected.calling_ae_title, expected.called_ae_title, expected.application_context_name)
        assert _contexts(got.presentation_context_definition_list) == \
            _contexts(expected.presentation_context_definition_list)
        assert _items(got.user_information) == _items(expected.user_information)
    assert first is not second
    assert not {id(c) for c in first.presentation_context_definition_list} & \
        {id(c) for c in second.presentation_context_definition_list}
    first.presentation_context_definition_list[0].transfer_syntax[0] = JPEG2000Lossless  # an association's change
    first.user_information[0].maximum_length_received = 1
    third = pdu.to_primitive()
    assert third.presentation_context_definition_list[0].transfer_syntax[0] == ExplicitVRLittleEndian
    assert third.user_information[0].maximum_length_received == 16384


def _supported() -> list[Any]:
    ae = AE("SCP_NODE")
    for cx in StoragePresentationContexts[:30]:  # 30 of the proposal's 40 ...
        if cx.abstract_syntax != CTImageStorage:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, JPEG2000Lossless])
    # ... one more only with a transfer syntax the proposal lacks (rejected 0x04), the rest not at all (0x03)
    ae.add_supported_context(StoragePresentationContexts[35].abstract_syntax, JPEG2000Lossless)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
    return ae.supported_contexts


@pytest.mark.parametrize("roles", [None, {CTImageStorage: (True, True)}, {CTImageStorage: (False, True)}])
def test_remembered_negotiation_equals_pynetdicoms_and_hands_out_copies(roles: Any) -> None:
    rq = A_ASSOCIATE_RQ.to_primitive(_request_pdu()).presentation_context_definition_list
    expected_cx, expected_roles = pynetdicom_negotiate(rq, _supported(), roles)
    results = [internals.negotiate_as_acceptor(rq, _supported(), roles) for _ in range(3)]
    for contexts, role_items in results:
        assert _contexts(contexts) == _contexts(expected_cx)
        assert _items(role_items) == _items(expected_roles)
    assert {r for _, _, _, r, _, _ in _contexts(expected_cx)} == {0x00, 0x03, 0x04}  # all three outcomes seen
    assert results[0][0][0] is not results[1][0][0]  # copies, never shared
    # a different proposal (or set of supported contexts) is negotiated, not looked up
    fewer = rq[:5]
    assert _contexts(internals.negotiate_as_acceptor(fewer, _supported(), roles)[0]) == \
        _contexts(pynetdicom_negotiate(fewer, _supported(), roles)[0])
    narrower = [cx for cx in _supported() if cx.abstract_syntax != rq[0].abstract_syntax]
    assert _contexts(internals.negotiate_as_acceptor(rq, narrower, roles)[0]) == \
        _contexts(pynetdicom_negotiate(rq, narrower, roles)[0])


def _accept_primitive(calling: str, transfer_syntax: str) -> A_ASSOCIATE:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "SCP_NODE"
    primitive.result, primitive.result_source = 0x00, 0x01
    contexts = []
    for i, uid in enumerate([CTImageStorage, MRImageStorage]):
        cx = build_context(uid, transfer_syntax)
        cx.context_id, cx.result = 2 * i + 1, 0x00
        contexts.append(cx)
    primitive.presentation_context_definition_results_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 0
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    primitive.user_information = [length, impl]
    return primitive


def test_remembered_accept_bytes_equal_pynetdicoms_encoding() -> None:
    cases = [("MODALITY", ExplicitVRLittleEndian), ("MODALITY", ImplicitVRLittleEndian),
             ("OTHER", ExplicitVRLittleEndian)]
    for calling, ts in cases * 2:  # the second time round, from memory
        primitive = _accept_primitive(calling, ts)
        assert negotiation.accept_pdu_bytes(primitive) == A_ASSOCIATE_AC(primitive).encode()
    assert len({negotiation.accept_pdu_bytes(_accept_primitive(c, t)) for c, t in cases}) == 3


def test_associations_with_a_remembered_negotiation_get_what_they_proposed() -> None:
    """Real associations against a waiting acceptor with the shortcuts installed: repeats of one
    request, the same request from another calling AE title, and a different request each get
    their own negotiation, and a repeat's A-ASSOCIATE-AC is byte for byte the first one's."""
    internals.install_negotiation_memo()
    ae = AE("SCP_NODE")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)],
                            server_class=ThreadedAssociationServer, request_handler=WakingRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)
    received: list[bytes] = []

    def associate(calling: str, contexts: list[tuple[str, list[str]]]) -> list[tuple[str, str, int]]:
        requestor = AE(calling)
        for uid, syntaxes in contexts:
            requestor.add_requested_context(uid, syntaxes)
        assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="SCP_NODE",
                                    evt_handlers=[(evt.EVT_DATA_RECV, lambda e: received.append(e.data))])
        assert assoc.is_established
        got = [(cx.abstract_syntax, cx.transfer_syntax[0], cx.result) for cx in assoc.accepted_contexts]
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        return got

    both = [(Verification, [ExplicitVRLittleEndian]), (CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]
    try:
        first = [associate("MODALITY", both) for _ in range(3)]
        acs = [data for data in received if data[:1] == b"\x02"]
        other = associate("OTHERMOD", both)
        echo = associate("MODALITY", [(Verification, [ImplicitVRLittleEndian])])
        acs_all = [data for data in received if data[:1] == b"\x02"]
    finally:
        server.shutdown()
    assert first == [[(Verification, ExplicitVRLittleEndian, 0), (CTImageStorage, ExplicitVRLittleEndian, 0)]] * 3
    assert other == first[0]
    assert echo == [(Verification, ImplicitVRLittleEndian, 0)]
    assert len(acs) == 3 and acs[0] == acs[1] == acs[2]
    assert acs_all[3] != acs[0] and acs_all[3][26:42] == b"OTHERMOD".ljust(16)  # its own calling AE echoed


def test_the_nodes_shared_supported_contexts_are_only_read() -> None:
    """The node's associations share the server's supported contexts (no copy per association):
    negotiating against them, remembered or not, equals pynetdicom's against a private copy and
    leaves them exactly as they were."""
    import copy

    from scp_node import config as config_mod
    from scp_node.dimse.listener import DimseListener, _ContextList

    listener = DimseListener.__new__(DimseListener)
    listener.config = config_mod.from_mapping({"node": {}}, Path("/tmp"), environ={})
    shared = _ContextList(listener._make_ae().supported_contexts)
    before = [copy.deepcopy(vars(cx)) for cx in shared]
    rq = A_ASSOCIATE_RQ.to_primitive(_request_pdu()).presentation_context_definition_list
    roles = {CTImageStorage: (True, False)}
    expected = pynetdicom_negotiate(rq, copy.deepcopy(list(shared)), roles)
    for _ in range(3):
        contexts, role_items = internals.negotiate_as_acceptor(rq, shared, roles)
        assert _contexts(contexts) == _contexts(expected[0]) and _items(role_items) == _items(expected[1])
        contexts[0].transfer_syntax = [JPEG2000Lossless]  # an association changing its result
    assert [vars(cx) for cx in shared] == before


def test_node_associations_share_the_servers_contexts_and_leave_them_unchanged() -> None:
    import copy

    from scp_node.dimse.listener import _ContextList

    internals.install_negotiation_memo()
    ae = AE("SCP_NODE")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    seen: list[Any] = []
    server = ae.make_server(("127.0.0.1", 0), server_class=ThreadedAssociationServer,
                            request_handler=WakingRequestHandler,
                            evt_handlers=[(evt.EVT_ACCEPTED, lambda e: seen.append(e.assoc.acceptor.supported_contexts))])
    server.contexts = _ContextList(server.contexts)  # as the node's server has them
    before = [copy.deepcopy(vars(cx)) for cx in server.contexts]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)
    try:
        for syntaxes in ([ImplicitVRLittleEndian], [ExplicitVRLittleEndian], [ImplicitVRLittleEndian]):
            requestor = AE("MODALITY")
            requestor.add_requested_context(CTImageStorage, syntaxes)
            assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="SCP_NODE")
            assert assoc.is_established
            assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == syntaxes
            assoc.release()
    finally:
        server.shutdown()
    assert len(seen) == 3 and all(contexts is server.contexts for contexts in seen)
    assert [vars(cx) for cx in server.contexts] == before
