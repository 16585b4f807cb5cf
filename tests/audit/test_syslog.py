"""IHE ATNA: audit rows as DICOM audit messages (PS3.15 A.5) in RFC 5424 syslog over TLS (RFC 5425),
received by a real rsyslogd (TLS listener, client certificate required) started by the test; the
XML of every message has the schema's required elements, and no clear patient identifier."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from xml.etree import ElementTree as ET

import pydicom
import pytest

from scp_node.audit.syslog import audit_message, syslog_frame
from scp_node.config import ConfigError, from_mapping
from scp_node.store.models import utcnow
from tests.faults.helpers import acknowledged, storescu
from tests.support.net import wait_for
from tests.support.node import start_node, write_config
from tests.support.paths import CXR, need_data
from tests.support.rsyslog import make_certs, start_rsyslog

_RFC5424 = re.compile(r"^<85>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) scp-node (\d+) IHE\+RFC-3881 - \ufeff(<.*)$")


def check_required(xml: str) -> ET.Element:
    """The elements and attributes PS3.15 A.5.1's schema requires of an AuditMessage."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    assert [c.tag for c in root][0] == "EventIdentification"
    ident = root.find("EventIdentification")
    assert ident is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", ident.get("EventDateTime", ""))
    assert ident.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    assert ident.get("EventActionCode") in ("C", "R", "U", "D", "E")
    coded = [ident.find("EventID")] + ident.findall("EventTypeCode")
    actives = root.findall("ActiveParticipant")
    assert actives, "at least one ActiveParticipant"
    for a in actives:
        assert a.get("UserID") and a.get("UserIsRequestor") in ("true", "false")
        coded += a.findall("RoleIDCode")
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID")
    coded += source.findall("AuditSourceTypeCode")
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        coded.append(obj.find("ParticipantObjectIDTypeCode"))
    for c in coded:  # CodedValueType: csd-code, codeSystemName and originalText are required
        assert c is not None and c.get("csd-code") and c.get("codeSystemName") and c.get("originalText"), \
            ET.tostring(c) if c is not None else None
    return root


def _row(**kw: object) -> SimpleNamespace:
    base = dict(event="instance.stored", outcome="success", ae_title="STORESCU", peer="10.1.2.3:40000",
                study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5",
                patient_hash="ab" * 16, detail="520 bytes via dimse", time=utcnow(), id=1)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("event, outcome, event_id, indicator", [
    ("instance.stored", "success", "110104", "0"), ("association.rejected", "failure", "110113", "4"),
    ("export.dead", "failure", "110104", "8"), ("node.started", "success", "110100", "0"),
    ("analysis.finished", "success", "110103", "0")])
def test_audit_message_per_event(event: str, outcome: str, event_id: str, indicator: str) -> None:
    root = check_required(audit_message(_row(event=event, outcome=outcome), ae_title="SCPNODE", hostname="node1"))
    ident = root.find("EventIdentification")
    assert ident is not None and ident.find("EventID").get("csd-code") == event_id  # type: ignore[union-attr]
    assert ident.get("EventOutcomeIndicator") == indicator
    assert ident.findtext("EventOutcomeDescription", "").startswith(event)
    objects = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")  # type: ignore[union-attr]
               for o in root.findall("ParticipantObjectIdentification")}
    assert objects == {"110180": "1.2.3", "2": "ab" * 16}


def test_transfer_names_both_sides_and_escapes_text() -> None:
    row = _row(detail='a <b> & "c"\x1b', ae_title="STORE<SCU")
    root = check_required(audit_message(row, ae_title="SCPNODE", hostname="node1"))
    parts = {a.find("RoleIDCode").get("csd-code"): a for a in root.findall("ActiveParticipant")}  # type: ignore[union-attr]
    assert parts["110153"].get("UserID") == "STORE<SCU" and parts["110153"].get("NetworkAccessPointID") == "10.1.2.3"
    assert parts["110153"].get("UserIsRequestor") == "true" and parts["110152"].get("UserIsRequestor") == "false"
    frame = syslog_frame(audit_message(row, ae_title="SCPNODE", hostname="n"), hostname="n",
                         when="2026-01-01T00:00:00.000Z")
    length, _, msg = frame.partition(b" ")
    assert int(length) == len(msg) and msg.startswith(b"<85>1 2026-01-01T00:00:00.000Z n scp-node ")


def test_syslog_url_must_be_tls(tmp_path: Path) -> None:
    for url in ("udp://h:514", "tls://h", "h:6514", "tcp://h:6514"):
        with pytest.raises(ConfigError, match="syslog_url"):
            from_mapping({"audit": {"syslog_url": url}}, tmp_path, environ={})
    with pytest.raises(ConfigError, match="syslog_cert and syslog_key"):
        from_mapping({"audit": {"syslog_url": "tls://h:6514", "syslog_cert": "c.pem"}}, tmp_path, environ={})


@pytest.mark.integration
def test_rsyslog_receives_every_audit_row_over_tls(tmp_path: Path, node_port: int, test_model_dir: Path) -> None:
    cxr = need_data(CXR / "RG1_UNCR.dcm")
    certs = make_certs(tmp_path / "certs")
    server = start_rsyslog(tmp_path / "rsyslog", certs)
    folder = tmp_path / "node"
    folder.mkdir()
    try:
        extra_audit = (f'syslog_url = "tls://127.0.0.1:{server.port}"\nsyslog_ca = "{certs.ca}"\n'
                       f'syslog_cert = "{certs.client_cert}"\nsyslog_key = "{certs.client_key}"\n')
        config = write_config(folder, model_dir=test_model_dir, port=node_port, stable_seconds=3600,
                              peers=[("STORESCU", "127.0.0.1")])
        config.write_text(config.read_text().replace("[audit]\n", "[audit]\n" + extra_audit, 1))
        node = start_node(config, node_port)
        try:
            out = storescu(node_port, [cxr]).communicate(timeout=120)[0]
            assert len(acknowledged(out)) == 1, out
            wait_for(lambda: any("instance.stored" in ln for ln in server.lines()), 30, what="instance.stored at rsyslog")
            # The syslog server goes away and comes back: rows written meanwhile arrive later.
            server.stop()
            out = storescu(node_port, [cxr], aet="UNKNOWN").communicate(timeout=120)[0]  # rejected: audited
            time.sleep(1.5)
            server = start_rsyslog_again(server, tmp_path, certs)
            wait_for(lambda: any("association.rejected" in ln for ln in server.lines()), 90, interval=0.5,
                     what="the row written while rsyslog was down")
        finally:
            assert node.stop() == 0, node.output()[-3000:]
        wait_for(lambda: any("node.stopped" in ln for ln in server.lines()), 15, what="node.stopped at rsyslog")
        lines = [ln for f in (tmp_path / "rsyslog").glob("received*.log") for ln in
                 f.read_text(encoding="utf-8").split("\n") if ln]
    finally:
        server.stop()
    with sqlite3.connect(folder / "index.db") as con:
        rows = con.execute("select event, patient_hash from audit_events order by id").fetchall()
    events = []
    for line in lines:
        m = _RFC5424.match(line)
        assert m, line[:300]
        root = check_required(m.group(4))
        events.append(root.find("EventIdentification").findtext("EventOutcomeDescription").split(":")[0])  # type: ignore[union-attr]
    # Every row of this run, in order, at least once (a resend after the outage may repeat some).
    assert list(dict.fromkeys(events)) == list(dict.fromkeys(e for e, _ in rows)), (events, rows)
    assert set(events) >= {"node.started", "association.accepted", "instance.stored", "association.rejected",
                           "node.stopped"}
    pid = str(pydicom.dcmread(cxr, stop_before_pixels=True).PatientID)
    assert not any(pid in ln for ln in lines)
    hashes = {h for _, h in rows if h}
    assert hashes and any(h in ln for ln in lines for h in hashes)


def start_rsyslog_again(old: "object", tmp_path: Path, certs: object) -> "object":
    """A new rsyslogd on the same port (the node's configured URL), writing to a second file."""
    from tests.support import rsyslog as rs

    folder = tmp_path / "rsyslog"
    conf = (folder / "rsyslog.conf").read_text().replace("received.log", "received2.log")
    (folder / "rsyslog.conf").write_text(conf)
    import subprocess

    proc = subprocess.Popen([rs.rsyslogd(), "-n", "-f", str(folder / "rsyslog.conf"), "-i",
                             str(folder / "rsyslogd.pid")], stdout=open(folder / "rsyslogd2.log", "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = rs.Rsyslog(proc, old.port, folder / "received2.log", folder / "rsyslogd2.log")  # type: ignore[attr-defined]
    from tests.support.net import wait_port

    wait_port(old.port, timeout=30)  # type: ignore[attr-defined]
    return server
