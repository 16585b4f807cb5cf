"""The allow-list: calling AE title AND address must match one [[peers]] entry."""

from __future__ import annotations

from scp_node.config import Peer
from scp_node.handlers import AccessList


def test_title_and_address_must_both_match() -> None:
    acl = AccessList((Peer("ORTHANC", "127.0.0.1"), Peer("CT1", "10.1.2.0/24")))
    assert acl.allows("ORTHANC", "127.0.0.1")
    assert acl.allows("ORTHANC ", "127.0.0.1")  # AE titles are space padded on the wire
    assert not acl.allows("ORTHANC", "127.0.0.2")
    assert not acl.allows("CT1", "127.0.0.1")
    assert acl.allows("CT1", "10.1.2.77")
    assert not acl.allows("CT1", "10.1.3.77")
    assert not acl.allows("UNKNOWN", "10.1.2.77")


def test_host_names_resolve_once_and_garbage_never_matches() -> None:
    acl = AccessList((Peer("LOCAL", "localhost"), Peer("NOWHERE", "no-such-host.invalid")))
    assert acl.allows("LOCAL", "127.0.0.1")
    assert not acl.allows("NOWHERE", "127.0.0.1")
    assert not acl.allows("LOCAL", "not-an-ip")


def test_empty_list_rejects_everyone_unless_explicitly_open() -> None:
    assert not AccessList(()).allows("ANY", "127.0.0.1")
    assert AccessList((), accept_unknown=True).allows("ANY", "127.0.0.1")
