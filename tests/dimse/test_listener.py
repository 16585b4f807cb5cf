"""scp_node.dimse.listener: the shared port, the fast context copy, the association counts across receivers."""

from __future__ import annotations

import copy
import socket

import pytest

from scp_node import config as config_mod
from scp_node.handlers.association import AssociationCounts
from scp_node.dimse.listener import (DimseListener, ListenError, _ContextList, open_listening_socket,
                               preferred_transfer_syntaxes)
from scp_node.dimse.receivers import receiver_count


def _config(**node: object) -> config_mod.Config:
    from pathlib import Path

    return config_mod.from_mapping({"node": dict(node)}, Path("/tmp"), environ={})


def test_receiver_count_auto_is_one_per_core_at_most_4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert receiver_count(_config()) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert receiver_count(_config()) == 2
    assert receiver_count(_config(receiver_processes=1)) == 1
    with pytest.raises(config_mod.ConfigError, match="receiver_processes"):
        _config(receiver_processes=-1)


def test_context_copy_equals_deepcopy_and_shares_nothing_mutable() -> None:
    listener = DimseListener.__new__(DimseListener)
    listener.config = _config()
    contexts = listener._make_ae().supported_contexts
    fast = copy.deepcopy(_ContextList(contexts))
    slow = copy.deepcopy(contexts)
    assert [vars(a) for a in fast] == [vars(b) for b in slow]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax for a, b in zip(fast, contexts))
    fast[0].transfer_syntax = [fast[0].transfer_syntax[0]]  # an association narrowing its copy...
    assert len(contexts[0].transfer_syntax) > 1  # ...leaves the server's contexts alone


def test_preferred_transfer_syntaxes_put_compressed_first_and_implicit_last() -> None:
    ts = preferred_transfer_syntaxes()
    assert ts[-1] == "1.2.840.10008.1.2"
    assert ts.index("1.2.840.10008.1.2.4.90") < ts.index("1.2.840.10008.1.2.1")


def test_every_transfer_syntax_the_ingest_knows_is_negotiated_retired_jpeg_included() -> None:
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    from scp_node.dimse.listener import NOT_FOR_DIMSE
    from scp_node.store.ingest import KNOWN_TRANSFER_SYNTAXES

    ts = preferred_transfer_syntaxes()
    assert len(ts) == len(set(ts))
    assert set(ts) == set(KNOWN_TRANSFER_SYNTAXES) - NOT_FOR_DIMSE
    assert set(ALL_TRANSFER_SYNTAXES) <= set(ts)
    assert {"1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"} <= set(ts)  # refused before: Orthanc keeps them


def test_a_port_in_use_is_a_clear_listen_error() -> None:
    taken = open_listening_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            open_listening_socket("127.0.0.1", port)
    finally:
        taken.close()


def test_listening_socket_does_not_block_a_losing_receiver() -> None:
    sock = open_listening_socket("127.0.0.1", 0)
    try:
        with pytest.raises(BlockingIOError):
            sock.accept()  # no connection waiting: EAGAIN at once, never a blocked accept thread
        assert isinstance(sock, socket.socket)
    finally:
        sock.close()


def test_association_counts_sum_the_other_receivers() -> None:
    slots = [0, 0, 0]
    mine, other = AssociationCounts(slots, 0), AssociationCounts(slots, 2)
    other.publish(3)
    assert mine.total_with(2) == 5 and mine.fewest_elsewhere() == 0
    mine.publish(2)
    assert slots == [2, 0, 3] and other.fewest_elsewhere() == 0 and AssociationCounts(slots, 1).fewest_elsewhere() == 2


def test_remembered_uid_validity_answers_as_pydicom() -> None:
    import re

    from pydicom.uid import RE_VALID_UID, UID

    from scp_node.dimse.listener import remember_uid_validity

    from scp_node.dimse.listener import forget_uid_validity

    original = UID.__dict__["is_valid"]
    remember_uid_validity()
    remember_uid_validity()  # once is enough; twice changes nothing
    try:
        assert UID.__dict__["is_valid"] is not original
        samples = ["1.2.3", "1.2.840.10008.1.2.4.90", "1.2.03", "", "a.b", "1." + "2" * 70, "0.0", "1..2", "1.2."]
        for text in samples * 2:  # the second round comes from the memo
            expected = len(text) <= 64 and re.match(RE_VALID_UID, text) is not None
            assert UID(text).is_valid is expected, text
    finally:
        forget_uid_validity()
    assert UID.__dict__["is_valid"] is original


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_listener_undoes_the_process_wide_settings_when_it_stops(tmp_path: "Path", audit_trail: object,
                                                                   ingestor: object, fast_path: bool) -> None:
    """pydicom's UID memo and reading validation mode, pynetdicom's settings and ACSE negotiation:
    set while a listener serves (the receive path), back as they were once the last one stops."""
    from pydicom import config as pydicom_config
    from pydicom.uid import UID
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom import acse

    from scp_node.dimse import pynetdicom_internals as internals

    def settings() -> tuple[object, ...]:
        return (pydicom_config.settings.reading_validation_mode, UID.__dict__["is_valid"],
                pynetdicom_config.STORE_RECV_CHUNKED_DATASET, pynetdicom_config.LOG_HANDLER_LEVEL,
                acse.negotiate_as_acceptor)

    before = settings()
    listening = open_listening_socket("127.0.0.1", 0)
    config = config_mod.from_mapping({"node": {"fast_path": fast_path}, "store": {"storage_dir": str(tmp_path)}},
                                     tmp_path, environ={})
    listener = DimseListener(config, audit_trail, ingestor, listening)  # type: ignore[arg-type]
    listener.start()
    try:
        during = settings()
        assert during[0] == pydicom_config.IGNORE and during[1] is not before[1]
        assert during[2] is (not fast_path)
        assert (during[4] is internals.negotiate_as_acceptor) is fast_path
    finally:
        listener.stop(grace=1)
        listening.close()
    assert settings() == before
